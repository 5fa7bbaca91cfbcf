"""Browser front end: an aiohttp server and a static page to talk to Moshi (see README.md)."""

from __future__ import annotations
