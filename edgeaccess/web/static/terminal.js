// The web terminal: xterm.js over the page's authenticated WebSocket.
// Client -> server: JSON text messages {type: "input", data} and
// {type: "resize", cols, rows}. Server -> client: binary messages are
// terminal output; text messages are JSON {type: "exit", status} or
// {type: "closed", reason}.
(function () {
  "use strict";
  var el = document.getElementById("terminal");
  var statusEl = document.getElementById("term-status");
  var term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  var scheme = location.protocol === "https:" ? "wss:" : "ws:";
  var ws = new WebSocket(scheme + "//" + location.host + el.dataset.ws);
  ws.binaryType = "arraybuffer";
  // Keystroke echo latency, measured in the page (benchmarks read it).
  var pending = [];
  var state = {
    term: term, ws: ws, status: "connecting", exitStatus: null, reason: null,
    latencies: [],
    text: function () {
      var buffer = term.buffer.active, lines = [];
      for (var i = 0; i < buffer.length; i++) {
        lines.push(buffer.getLine(i).translateToString(true));
      }
      return lines.join("\n");
    }
  };
  window.edgeTerminal = state;

  function setStatus(text, kind) {
    state.status = kind;
    statusEl.textContent = text;
    statusEl.className = "status " + kind;
  }
  function send(message) {
    if (ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(message)); }
  }
  ws.onopen = function () {
    setStatus("connected", "connected");
    send({ type: "resize", cols: term.cols, rows: term.rows });
    term.focus();
  };
  ws.onmessage = function (event) {
    if (typeof event.data === "string") {
      var message = JSON.parse(event.data);
      if (message.type === "exit") {
        state.exitStatus = message.status;
        term.write("\r\n\x1b[1m[exit status " + message.status + "]\x1b[0m\r\n");
      } else if (message.type === "closed") {
        state.reason = message.reason;
        term.write("\r\n\x1b[1m[" + message.reason + "]\x1b[0m\r\n");
      }
      return;
    }
    if (pending.length) {
      state.latencies.push(performance.now() - pending[0]);
      pending = [];
    }
    term.write(new Uint8Array(event.data));
  };
  ws.onclose = function () {
    var text = "closed";
    if (state.exitStatus !== null) { text = "exited with status " + state.exitStatus; }
    else if (state.reason) { text = "closed: " + state.reason; }
    setStatus(text, "closed");
    term.options.disableStdin = true;
  };
  term.onData(function (data) {
    pending.push(performance.now());
    send({ type: "input", data: data });
  });
  term.onResize(function (size) { send({ type: "resize", cols: size.cols, rows: size.rows }); });
  window.addEventListener("resize", function () { fit.fit(); });
})();
