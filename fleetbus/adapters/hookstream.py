"""The JavaScript client of the sidecar's hook stream, shared by the pi extension and the
opencode plugin (both run inside the runtime's own JavaScript engine: Node for pi, Bun for
opencode 1.18.33, where ``node:net`` works the same).

``fleetbusStream(path)`` returns ``{send, close}``. ``send(obj)`` writes ``obj`` as one JSON line
to the Unix stream socket at ``path`` (``$FLEETBUS_HOOK_STREAM``) over one persistent
connection, so events keep their order. It never blocks the runtime and never throws into it:
with no ``path`` it does nothing; while the socket is missing, lines wait at most 10 s (at most
256 of them), with a reconnect every 500 ms, and are then dropped. ``close()`` ends the
connection and drops what waits (pi calls it on ``session_shutdown``).
"""

#: JavaScript source defining ``fleetbusStream`` (needs ``import * as net from "node:net"``).
STREAM_CLIENT_JS = r"""const fleetbusStream = (path) => {
  const MAX_QUEUE = 256;
  const MAX_AGE_MS = 10000;
  const RETRY_MS = 500;
  let sock = null;
  let connected = false;
  let closed = false;
  let timer = null;
  let queue = [];

  const prune = () => {
    const now = Date.now();
    queue = queue.filter(([t]) => now - t <= MAX_AGE_MS).slice(-MAX_QUEUE);
  };
  const retry = () => {
    prune();
    if (timer || closed || sock || queue.length === 0) return;
    timer = setTimeout(() => { timer = null; connect(); }, RETRY_MS);
    try { if (timer.unref) timer.unref(); } catch {}
  };
  const connect = () => {
    if (sock || closed || !path) return;
    let s;
    try {
      s = net.createConnection({ path });
    } catch {
      retry();
      return;
    }
    sock = s;
    s.on("error", () => {});
    s.on("connect", () => {
      connected = true;
      prune();
      const lines = queue.map(([, l]) => l).join("");
      queue = [];
      try { if (lines) s.write(lines); } catch {}
    });
    s.on("close", () => {
      if (sock === s) { sock = null; connected = false; }
      retry();
    });
    try { if (s.unref) s.unref(); } catch {}
  };
  const send = (obj) => {
    if (!path || closed) return;
    try {
      const line = JSON.stringify(obj) + "\n";
      if (sock && connected) { sock.write(line); return; }
      queue.push([Date.now(), line]);
      connect();
    } catch {}
  };
  const close = () => {
    closed = true;
    queue = [];
    if (timer) { clearTimeout(timer); timer = null; }
    try { if (sock) sock.end(); } catch {}
  };
  return { send, close };
};
"""
