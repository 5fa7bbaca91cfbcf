// Audio thread: microphone -> frames at the model's rate for the page, and Moshi's audio ->
// speaker through a small jitter buffer. The model's rate and frame size come from the page
// (processorOptions: modelRate, frameSize; the server's values). When the AudioContext does
// not run at the model's rate (Firefox with a 48 kHz microphone, for instance) both directions
// are resampled here.

const PREBUFFER_MS = 120; // Moshi audio before playback (re)starts
const MAX_BUFFERED_MS = 600; // beyond this, skip ahead instead of lagging
const RING_SIZE = 1 << 16; // power of two, > the 600 ms buffer + one message
const STATS_INTERVAL_S = 0.25;

// Second-order low-pass (RBJ cookbook biquad), run before decimating the microphone so that
// content above 12 kHz does not fold back into the speech band.
class LowPass {
  constructor(cutoffHz, rate) {
    const w0 = (2 * Math.PI * cutoffHz) / rate;
    const alpha = Math.sin(w0) / (2 * Math.SQRT1_2);
    const cosW0 = Math.cos(w0);
    const a0 = 1 + alpha;
    this.b0 = (1 - cosW0) / 2 / a0;
    this.b1 = (1 - cosW0) / a0;
    this.b2 = this.b0;
    this.a1 = (-2 * cosW0) / a0;
    this.a2 = (1 - alpha) / a0;
    this.x1 = 0; this.x2 = 0; this.y1 = 0; this.y2 = 0;
  }

  run(samples) {
    for (let i = 0; i < samples.length; i++) {
      const x = samples[i];
      const y = this.b0 * x + this.b1 * this.x1 + this.b2 * this.x2
        - this.a1 * this.y1 - this.a2 * this.y2;
      this.x2 = this.x1; this.x1 = x;
      this.y2 = this.y1; this.y1 = y;
      samples[i] = y;
    }
  }
}

class MoshiIO extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { modelRate, frameSize } = options.processorOptions;
    this.modelRate = modelRate;
    this.frameSize = frameSize;
    this.prebufferSamples = Math.round((PREBUFFER_MS * modelRate) / 1000);
    this.maxBufferedSamples = Math.round((MAX_BUFFERED_MS * modelRate) / 1000);
    // `sampleRate` is the AudioContext's rate (a global of the worklet scope).
    this.captureStep = sampleRate / modelRate; // input samples per model sample
    this.playStep = modelRate / sampleRate; // model samples per output sample
    this.filters = sampleRate > modelRate
      ? [new LowPass(0.45 * modelRate, sampleRate), new LowPass(0.45 * modelRate, sampleRate)]
      : [];
    this.scratch = new Float32Array(128);

    this.capturing = false;
    this.frame = new Float32Array(frameSize);
    this.frameFill = 0;
    this.capturePos = 0; // next model-rate sample, in input samples from the block start
    this.lastInput = 0; // last input sample of the previous block (index -1)

    this.ring = new Float32Array(RING_SIZE);
    this.written = 0; // total model-rate samples received
    this.readPos = 0; // fractional read position in the same count
    this.playing = false;
    this.underruns = 0;
    this.skippedSamples = 0;
    this.lastStats = 0;

    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "play") {
      this.push(msg.samples);
    } else if (msg.type === "capture") {
      this.capturing = msg.on;
      this.frameFill = 0;
    } else if (msg.type === "flush") {
      this.readPos = this.written;
      this.playing = false;
    }
  }

  push(samples) {
    const n = Math.min(samples.length, RING_SIZE - this.maxBufferedSamples);
    for (let i = 0; i < n; i++) {
      this.ring[(this.written + i) & (RING_SIZE - 1)] = samples[i];
    }
    this.written += n;
    const excess = this.written - this.readPos - this.maxBufferedSamples;
    if (excess > 0) { // arriving faster than played (e.g. a burst after a stall)
      this.readPos += excess;
      this.skippedSamples += excess;
    }
  }

  process(inputs, outputs) {
    const input = inputs[0];
    if (this.capturing && input && input.length > 0) {
      this.capture(input[0]);
    }
    const output = outputs[0];
    if (output && output.length > 0) {
      this.render(output[0]);
      for (let c = 1; c < output.length; c++) output[c].set(output[0]);
    }
    if (currentTime - this.lastStats >= STATS_INTERVAL_S) {
      this.lastStats = currentTime;
      this.port.postMessage({
        type: "stats",
        bufferedMs: (1000 * (this.written - this.readPos)) / this.modelRate,
        underruns: this.underruns,
        skippedMs: (1000 * this.skippedSamples) / this.modelRate,
        playing: this.playing,
      });
    }
    return true;
  }

  capture(block) {
    if (this.captureStep === 1) {
      for (let i = 0; i < block.length; i++) this.emit(block[i]);
      return;
    }
    let x = block;
    if (this.filters.length) {
      if (this.scratch.length !== block.length) this.scratch = new Float32Array(block.length);
      this.scratch.set(block);
      for (const f of this.filters) f.run(this.scratch);
      x = this.scratch;
    }
    // Linear interpolation; index -1 is the previous block's last sample.
    const n = x.length;
    let t = this.capturePos;
    while (t < n - 1) {
      const i = Math.floor(t);
      const frac = t - i;
      const a = i < 0 ? this.lastInput : x[i];
      this.emit(a + (x[i + 1] - a) * frac);
      t += this.captureStep;
    }
    this.capturePos = t - n;
    this.lastInput = x[n - 1];
  }

  emit(sample) {
    this.frame[this.frameFill++] = sample;
    if (this.frameFill === this.frameSize) {
      let energy = 0;
      for (let i = 0; i < this.frameSize; i++) energy += this.frame[i] * this.frame[i];
      const samples = this.frame;
      this.port.postMessage({ type: "frame", samples, rms: Math.sqrt(energy / this.frameSize) },
        [samples.buffer]);
      this.frame = new Float32Array(this.frameSize);
      this.frameFill = 0;
    }
  }

  render(out) {
    if (!this.playing) {
      if (this.written - this.readPos >= this.prebufferSamples) {
        this.playing = true;
      } else {
        out.fill(0);
        return;
      }
    }
    const mask = RING_SIZE - 1;
    for (let j = 0; j < out.length; j++) {
      const i = Math.floor(this.readPos);
      if (i + 1 >= this.written) { // ran dry: silence, then wait for a new prebuffer
        out.fill(0, j);
        this.playing = false;
        this.underruns++;
        return;
      }
      const frac = this.readPos - i;
      const a = this.ring[i & mask];
      out[j] = a + (this.ring[(i + 1) & mask] - a) * frac;
      this.readPos += this.playStep;
    }
  }
}

registerProcessor("moshi-io", MoshiIO);
