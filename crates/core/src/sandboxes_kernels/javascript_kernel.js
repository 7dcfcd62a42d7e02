// sandgate's persistent JavaScript interpreter for one sandbox ("code contexts").
// Started on the first JavaScript cell by the client; serves one cell at a time on
// a Unix socket; globals (and top-level let/const) live in one vm context.
"use strict";
const net = require("net");
const vm = require("vm");
const fs = require("fs");
const { Console } = require("console");
const { Writable } = require("stream");

const SOCK = "/tmp/.sandgate/javascript.sock";

const sandbox = {
  require, module, exports: module.exports, process, Buffer, URL, TextEncoder, TextDecoder,
  setTimeout, setInterval, setImmediate, clearTimeout, clearInterval, clearImmediate,
};
sandbox.globalThis = sandbox;
const context = vm.createContext(sandbox);

function send(conn, msg) {
  try { conn.write(JSON.stringify(msg) + "\n"); } catch (_) {}
}

function jsonable(value) {
  if (value === undefined || typeof value === "function") return null;
  try {
    const text = JSON.stringify(value);
    return text === undefined ? null : JSON.parse(text);
  } catch (_) {
    return require("util").inspect(value);
  }
}

function runCell(conn, code, timeoutMs) {
  const stream = (type) => new Writable({
    write(chunk, _enc, done) { send(conn, { type, data: chunk.toString() }); done(); },
  });
  sandbox.console = new Console({ stdout: stream("stdout"), stderr: stream("stderr") });
  let result = null, error = null;
  try {
    const options = { filename: "<cell>" };
    if (timeoutMs > 0) options.timeout = timeoutMs;
    result = jsonable(vm.runInContext(code, context, options));
  } catch (e) {
    error = e && e.code === "ERR_SCRIPT_EXECUTION_TIMEOUT" ? "Timeout" : (e && e.name) || "Error";
    const text = e && e.stack
      ? String(e.stack).split("\n").filter((l) => !l.includes("javascript-kernel") && !l.includes("node:")).join("\n")
      : String(e);
    send(conn, { type: "stderr", data: text + "\n" });
  }
  send(conn, { type: "done", result, error });
}

function serve() {
  const server = net.createServer((conn) => {
    let buffer = "";
    conn.on("data", (chunk) => {
      buffer += chunk.toString();
      const nl = buffer.indexOf("\n");
      if (nl < 0) return;
      const request = JSON.parse(buffer.slice(0, nl));
      buffer = "";
      runCell(conn, request.code, request.timeoutMs || 0);
      conn.end();
    });
    conn.on("error", () => {});
  });
  server.listen(SOCK, () => fs.chmodSync(SOCK, 0o600));
  server.on("error", (e) => {
    if (e.code !== "EADDRINUSE") throw e;
    // Another kernel, or a stale socket: ask it.
    const probe = net.connect(SOCK, () => process.exit(0));
    probe.on("error", () => { fs.unlinkSync(SOCK); server.listen(SOCK, () => fs.chmodSync(SOCK, 0o600)); });
  });
}

fs.mkdirSync("/tmp/.sandgate", { recursive: true });
serve();
