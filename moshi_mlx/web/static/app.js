// Page logic: microphone -> worklet -> WebSocket /api/chat -> worklet -> speaker, plus text.
// Wire format: moshi_mlx/web/README.md. State for people is on screen; state for tests is on
// `window.moshi` (counters only grow during a conversation and are reset by Connect).

const KIND_HANDSHAKE = 0x00;
const KIND_AUDIO = 0x01;
const KIND_TEXT = 0x02;
const KIND_STATUS = 0x05;
// The audio format is the server's (moshi_mlx.audio.rates): written into this page as it is served,
// so that the AudioContext can be made at that rate within the click, and repeated in the
// handshake, which must agree.
const [MODEL_RATE, FRAME_SIZE] = document
  .querySelector('meta[name="moshi-audio"]').content.split(",").map(Number);
const FRAME_MS = (1000 * FRAME_SIZE) / MODEL_RATE;
// The WebSocket subprotocol that selects the server's PCM protocol on /api/chat (without it
// the server speaks Kyutai's Opus protocol, for Kyutai's own clients).
const SUBPROTOCOL = document.querySelector('meta[name="moshi-protocol"]').content;
const MAX_WS_BACKLOG_BYTES = 16 * (1 + 2 * FRAME_SIZE); // ~1.3 s of audio not yet sent

const el = (id) => document.getElementById(id);
const ui = {
  connection: el("connection"),
  connectionText: el("connection-text"),
  button: el("connect"),
  mic: el("mic"),
  textPrompt: el("text-prompt"),
  micLevel: el("mic-level"),
  lagLevel: el("lag-level"),
  lagText: el("lag-text"),
  details: el("details"),
  transcript: el("transcript"),
  message: el("message"),
};

const moshi = {
  state: "idle", // idle | connecting | connected | busy | error | disconnected
  message: "",
  contextSampleRate: null,
  resampling: false,
  handshake: null,
  framesSent: 0,
  framesNotSent: 0,
  audioFramesReceived: 0,
  nonSilentAudioFrames: 0,
  peakReceived: 0,
  textPieces: 0,
  text: "",
  micRms: 0,
  serverDroppedFrames: 0,
  serverStepMs: null,
  lagMs: null,
  bufferedMs: 0,
  underruns: 0,
};
window.moshi = moshi;

let session = null; // { ws, ctx, stream, node }

function resetCounters() {
  Object.assign(moshi, {
    message: "", handshake: null, framesSent: 0, framesNotSent: 0, audioFramesReceived: 0,
    nonSilentAudioFrames: 0, peakReceived: 0, textPieces: 0, text: "", micRms: 0,
    serverDroppedFrames: 0, serverStepMs: null, lagMs: null, bufferedMs: 0, underruns: 0,
  });
  ui.transcript.textContent = "";
  render();
}

const STATE_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  connected: "connected",
  busy: "busy",
  error: "error",
  disconnected: "disconnected",
};

function setState(state, message) {
  moshi.state = state;
  if (message !== undefined) moshi.message = message;
  render();
}

function render() {
  ui.connection.className = `pill state-${moshi.state}`;
  ui.connectionText.textContent = STATE_TEXT[moshi.state] || moshi.state;
  const active = moshi.state === "connecting" || moshi.state === "connected";
  ui.button.textContent = active ? "Disconnect" : "Connect";
  ui.button.classList.toggle("stop", active);
  ui.mic.disabled = active;
  ui.textPrompt.disabled = active;
  ui.message.hidden = !moshi.message;
  ui.message.textContent = moshi.message;

  ui.micLevel.style.width = `${Math.min(100, Math.sqrt(moshi.micRms) * 180)}%`;
  if (moshi.lagMs === null) {
    ui.lagText.textContent = "–";
    ui.lagLevel.style.width = "0%";
  } else {
    ui.lagText.textContent = `${Math.round(moshi.lagMs)} ms`;
    ui.lagLevel.style.width = `${Math.min(100, moshi.lagMs / 10)}%`; // full bar = 1 s
    ui.lagLevel.classList.toggle("warn", moshi.lagMs >= 300 && moshi.lagMs < 600);
    ui.lagLevel.classList.toggle("bad", moshi.lagMs >= 600);
  }
  const step = moshi.serverStepMs === null ? "–" : `${moshi.serverStepMs.toFixed(0)} ms`;
  ui.details.textContent =
    `sent ${moshi.framesSent} · received ${moshi.audioFramesReceived} · ` +
    `model step ${step} · dropped ${moshi.serverDroppedFrames} · ` +
    `buffer ${Math.round(moshi.bufferedMs)} ms · underruns ${moshi.underruns}` +
    (moshi.contextSampleRate ? ` · audio ${moshi.contextSampleRate} Hz` +
      (moshi.resampling ? " (resampled)" : "") : "");
}

function updateLag() {
  // Frames still on their way: sent, not yet answered, not dropped by the server for lag.
  const inFlight = moshi.framesSent - moshi.audioFramesReceived - moshi.serverDroppedFrames;
  moshi.lagMs = Math.max(0, inFlight) * FRAME_MS + moshi.bufferedMs;
}

function newContext(rate) {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  const options = { latencyHint: "interactive" };
  if (rate) options.sampleRate = rate;
  return new Ctx(options);
}

// Called synchronously from the click, before any await: Safari lets only a context created
// during a user gesture start playing.
function contextForGesture() {
  // `?resample` in the address forces the fallback path (to test it in any browser).
  if (new URLSearchParams(location.search).has("resample")) return null;
  try {
    return newContext(MODEL_RATE);
  } catch (err) {
    return null; // this browser cannot run a context at 24 kHz
  }
}

async function openAudio(stream, ctx) {
  let source = null;
  if (ctx) {
    try {
      source = ctx.createMediaStreamSource(stream);
    } catch (err) {
      // Older Firefox releases cannot connect a microphone to a context at another rate.
      ctx.close();
      ctx = null;
    }
  }
  if (!ctx) { // run at the device rate and let the worklet resample
    ctx = newContext(null);
    source = ctx.createMediaStreamSource(stream);
  }
  await ctx.audioWorklet.addModule("/static/worklet.js");
  const node = new AudioWorkletNode(ctx, "moshi-io", {
    numberOfInputs: 1,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    processorOptions: { modelRate: MODEL_RATE, frameSize: FRAME_SIZE },
  });
  source.connect(node);
  node.connect(ctx.destination);
  await ctx.resume();
  moshi.contextSampleRate = ctx.sampleRate;
  moshi.resampling = ctx.sampleRate !== MODEL_RATE;
  return { ctx, node };
}

async function listMicrophones() {
  try {
    const devices = await navigator.mediaDevices.enumerateDevices();
    const chosen = ui.mic.value;
    ui.mic.replaceChildren(new Option("default", ""));
    for (const d of devices) {
      if (d.kind === "audioinput" && d.deviceId && d.deviceId !== "default") {
        ui.mic.add(new Option(d.label || `microphone ${ui.mic.length}`, d.deviceId));
      }
    }
    ui.mic.value = chosen;
    if (ui.mic.value !== chosen) ui.mic.value = "";
  } catch (err) {
    // enumerateDevices is optional: keep the default entry.
  }
}

function floatToMessage(samples) {
  const buffer = new ArrayBuffer(1 + 2 * samples.length);
  const view = new DataView(buffer);
  view.setUint8(0, KIND_AUDIO);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
    view.setInt16(1 + 2 * i, v, true);
  }
  return buffer;
}

function messageToFloat(view) {
  const n = (view.byteLength - 1) >> 1;
  const samples = new Float32Array(n);
  for (let i = 0; i < n; i++) samples[i] = view.getInt16(1 + 2 * i, true) / 32768;
  return samples;
}

function onWorkletMessage(msg) {
  if (msg.type === "frame") {
    moshi.micRms = msg.rms;
    const ws = session && session.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || moshi.state !== "connected") return;
    if (ws.bufferedAmount > MAX_WS_BACKLOG_BYTES) {
      moshi.framesNotSent++; // the network is not keeping up: drop rather than pile up
      return;
    }
    ws.send(floatToMessage(msg.samples));
    moshi.framesSent++;
    updateLag();
  } else if (msg.type === "stats") {
    moshi.bufferedMs = msg.bufferedMs;
    moshi.underruns = msg.underruns;
    updateLag();
    render();
  }
}

function onSocketMessage(event) {
  const data = event.data;
  if (!(data instanceof ArrayBuffer) || data.byteLength === 0) return;
  const view = new DataView(data);
  const kind = view.getUint8(0);
  if (kind === KIND_AUDIO) {
    const samples = messageToFloat(view);
    let peak = 0;
    for (let i = 0; i < samples.length; i++) peak = Math.max(peak, Math.abs(samples[i]));
    moshi.audioFramesReceived++;
    if (peak > 0) moshi.nonSilentAudioFrames++;
    moshi.peakReceived = Math.max(moshi.peakReceived, peak);
    session.node.port.postMessage({ type: "play", samples }, [samples.buffer]);
    updateLag();
  } else if (kind === KIND_TEXT) {
    const piece = new TextDecoder().decode(new Uint8Array(data, 1));
    moshi.textPieces++;
    moshi.text += piece;
    ui.transcript.textContent = moshi.text;
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  } else if (kind === KIND_HANDSHAKE) {
    moshi.handshake = parseJson(data);
    const hs = moshi.handshake || {};
    if (hs.sample_rate !== MODEL_RATE || hs.frame_size !== FRAME_SIZE) {
      setState("error", "the server speaks another audio format: reload the page");
      session.ws.close();
      return;
    }
    setState("connected", "");
    session.node.port.postMessage({ type: "capture", on: true });
  } else if (kind === KIND_STATUS) {
    const status = parseJson(data) || {};
    if (status.type === "lag") {
      moshi.serverDroppedFrames = status.dropped_frames;
      moshi.serverStepMs = status.step_ms;
      updateLag();
    } else if (status.type === "busy") {
      setState("busy", status.message || "Moshi is busy with another client.");
    } else if (status.type === "error") {
      setState("error", status.message || "server error");
    }
  }
  render();
}

function parseJson(data) {
  try {
    return JSON.parse(new TextDecoder().decode(new Uint8Array(data, 1)));
  } catch (err) {
    return null;
  }
}

async function connect() {
  resetCounters();
  setState("connecting", "");
  let ctx = contextForGesture();
  let stream = null;
  try {
    const audio = {
      echoCancellation: true,
      noiseSuppression: true,
      autoGainControl: true,
      channelCount: 1,
    };
    if (ui.mic.value) audio.deviceId = { exact: ui.mic.value };
    stream = await navigator.mediaDevices.getUserMedia({ audio });
    listMicrophones();
    const opened = await openAudio(stream, ctx);
    ctx = opened.ctx;
    const node = opened.node;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(chatUrl(scheme), [SUBPROTOCOL]);
    ws.binaryType = "arraybuffer";
    session = { ws, ctx, stream, node };
    node.port.onmessage = (event) => onWorkletMessage(event.data);
    ws.onmessage = onSocketMessage;
    ws.onclose = (event) => {
      if (moshi.state === "connected" || moshi.state === "connecting") {
        const why = event.code === 1000 || event.code === 1005 ? "" : `closed (${event.code})`;
        setState(event.code === 1000 || event.code === 1005 ? "disconnected" : "error",
          why && (moshi.message || `connection ${why}`));
      }
      teardown();
    };
    ws.onerror = () => {
      if (moshi.state === "connecting") setState("error", "cannot reach the server");
    };
  } catch (err) {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ctx && !session) ctx.close();
    teardown();
    setState("error", `microphone or audio unavailable: ${err.message || err}`);
  }
}

// The conversation's address: the text prompt, when one is typed, goes as `text_prompt` (the
// server runs it before its handshake; without it the server's own prompt applies).
function chatUrl(scheme) {
  const url = new URL(`${scheme}://${location.host}/api/chat`);
  const prompt = ui.textPrompt.value.trim();
  if (prompt) url.searchParams.set("text_prompt", prompt);
  return url.toString();
}

function teardown() {
  if (!session) return;
  const { ws, ctx, stream, node } = session;
  session = null;
  node.port.onmessage = null;
  if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(1000);
  stream.getTracks().forEach((t) => t.stop());
  ctx.close();
  moshi.micRms = 0;
  render();
}

ui.button.addEventListener("click", () => {
  if (moshi.state === "connecting" && !session) return; // still asking for the microphone
  if (session) {
    setState("disconnected", "");
    teardown();
  } else {
    connect();
  }
});

listMicrophones();
render();
