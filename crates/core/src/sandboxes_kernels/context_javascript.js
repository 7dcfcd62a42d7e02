// sandgate's JavaScript (Node.js) kernel for one code context (E2B's code
// interpreter), read by a one-line loader from the first line of stdin. The
// protocol is context_python.py's: requests a line on stdin
// ({"code", "env"}), events a line on stdout ("ready", then per cell "start",
// "stdout"/"stderr", "result", "error", "end").
//
// Cells run in the kernel's own global scope, as in Node's REPL: globals and
// top-level let/const/class persist, the completion value of the cell is its
// result (a promise is awaited), `await` works at top level when Node's REPL
// transform is reachable (the kernel runs with --expose-internals for it).
// console, process.stdout and process.stderr are captured; the protocol is
// written to fd 1 directly. SIGINT interrupts a running cell and is otherwise
// ignored.
"use strict";
(() => {
  const fs = require("fs");
  const util = require("util");
  const vm = require("vm");
  const { Console } = require("console");
  const { Readable, Writable } = require("stream");

  let topLevelAwait = null;
  try {
    ({ processTopLevelAwait: topLevelAwait } = require("internal/repl/await"));
  } catch (_) {
    // Without the REPL's transform, `await` needs an async function.
  }

  // ---- protocol -------------------------------------------------------------

  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  function writeAll(text) {
    let buf = Buffer.from(text, "utf8");
    while (buf.length > 0) {
      try {
        buf = buf.subarray(fs.writeSync(1, buf));
      } catch (e) {
        if (e.code === "EAGAIN") {
          Atomics.wait(sleeper, 0, 0, 1);
          continue;
        }
        process.exit(0); // the server is gone
      }
    }
  }
  // Lone surrogates would make a line the server cannot read.
  const wellFormed = (_key, value) => (typeof value === "string" ? value.toWellFormed() : value);
  const emit = (msg) => writeAll(JSON.stringify(msg, wellFormed) + "\n");

  // ---- output ---------------------------------------------------------------

  const FLUSH_AFTER_MS = 50;
  const BATCH_LIMIT = 64 * 1024;
  let capturing = false; // output outside a cell is dropped
  let pending = { kind: null, text: "", since: 0 };
  let timer = null;
  let lastFlush = 0;

  function flush() {
    if (timer) {
      clearTimeout(timer);
      timer = null;
    }
    if (pending.text) {
      emit({ type: pending.kind, text: pending.text });
      lastFlush = Date.now();
    }
    pending = { kind: null, text: "", since: 0 };
  }

  function write(kind, text) {
    if (!capturing || !text) return;
    if (pending.kind !== kind) {
      flush();
      pending = { kind, text: "", since: Date.now() };
    }
    while (text) {
      const room = BATCH_LIMIT - pending.text.length;
      pending.text += text.slice(0, room);
      text = text.slice(room);
      if (pending.text.length >= BATCH_LIMIT) {
        flush();
        pending = { kind, text: "", since: Date.now() };
      }
    }
    // A cell busy in synchronous code never lets a timer run: what follows a
    // quiet spell goes out at once, and a batch as soon as it is due.
    const now = Date.now();
    if (now - lastFlush >= FLUSH_AFTER_MS || now - pending.since >= FLUSH_AFTER_MS) flush();
    else if (!timer) timer = setTimeout(flush, FLUSH_AFTER_MS);
  }

  const stream = (kind) => {
    const s = new Writable({
      decodeStrings: false,
      write(chunk, _encoding, done) {
        write(kind, typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8"));
        done();
      },
    });
    s.isTTY = false;
    return s;
  };
  const stdout = stream("stdout");
  const stderr = stream("stderr");
  const input = process.stdin;
  const noInput = new Readable({ read() { this.push(null); } });
  for (const [name, value] of [["stdout", stdout], ["stderr", stderr], ["stdin", noInput]]) {
    Object.defineProperty(process, name, { configurable: true, enumerable: true, get: () => value });
  }
  const userConsole = new Console({ stdout, stderr });
  Object.defineProperty(globalThis, "console", { configurable: true, writable: true, value: userConsole });
  process.on("uncaughtException", (e) => write("stderr", `Uncaught ${util.inspect(e)}\n`));
  process.on("unhandledRejection", (e) => write("stderr", `Uncaught (in promise) ${util.inspect(e)}\n`));

  // ---- results ----------------------------------------------------------------

  function bundle(value) {
    let data = {};
    const show = value !== null && value !== undefined ? value[Symbol.for("Jupyter.display")] : undefined;
    if (typeof show === "function") {
      try {
        const got = show.call(value);
        if (got && typeof got === "object") data = { ...got };
      } catch (_) {
        // As with Python's _repr_*_: a failing rich view leaves the plain one.
      }
    }
    if (typeof data["text/plain"] !== "string") data["text/plain"] = util.inspect(value);
    return data;
  }

  function result(value, main) {
    const data = bundle(value);
    flush(); // what was printed before comes before
    emit({ type: "result", main, data });
  }

  globalThis.display = (...values) => values.forEach((v) => result(v, false));
  globalThis.require = require;
  globalThis.module = module;
  globalThis.exports = module.exports;

  // ---- cells ------------------------------------------------------------------

  let count = 0;
  let interrupt = null; // rejects what a running cell awaits, on SIGINT
  process.on("SIGINT", () => {
    if (interrupt) interrupt();
  });

  function interrupted() {
    const e = new Error("Script execution was interrupted by `SIGINT`");
    e.code = "ERR_SCRIPT_EXECUTION_INTERRUPTED";
    return e;
  }

  function interruptible(promise) {
    return new Promise((resolve, reject) => {
      interrupt = () => reject(interrupted());
      Promise.resolve(promise).then(resolve, reject);
    }).finally(() => {
      interrupt = null;
    });
  }

  // As Node's REPL: `{...}` alone is an object, not a block; top-level await.
  function compile(code, filename) {
    if (/^\s*\{/.test(code) && !/;\s*$/.test(code)) {
      try {
        return { script: new vm.Script(`(${code}\n)`, { filename }), wrapped: false };
      } catch (_) {
        // Not an object literal after all.
      }
    }
    try {
      return { script: new vm.Script(code, { filename }), wrapped: false };
    } catch (e) {
      let rewritten = null;
      try {
        rewritten = e instanceof SyntaxError && topLevelAwait ? topLevelAwait(code) : null;
      } catch (_) {
        // The transform could not parse it either: report the first error.
      }
      if (rewritten === null) throw e;
      return { script: new vm.Script(rewritten, { filename }), wrapped: true };
    }
  }

  async function evaluate(code, filename) {
    const { script, wrapped } = compile(code, filename);
    const value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    if (wrapped) return ((await interruptible(value)) || {}).value;
    if (value !== null && typeof value === "object" && typeof value.then === "function") {
      return interruptible(value);
    }
    return value;
  }

  function text(value) {
    try {
      return String(value);
    } catch (_) {
      return util.inspect(value);
    }
  }

  function errorEvent(e) {
    const isError = e !== null && typeof e === "object" && typeof e.stack === "string";
    if (!isError) {
      return { type: "error", name: "Error", value: text(e), traceback: `Uncaught ${util.inspect(e)}` };
    }
    // The kernel's own frames and Node's internals are not the cell's.
    const traceback = e.stack
      .split("\n")
      .filter((line) => !/^\s+at .*(\[eval\]|node:)/.test(line))
      .join("\n");
    return { type: "error", name: text(e.name || "Error"), value: text(e.message ?? ""), traceback };
  }

  function setEnv(env) {
    const saved = {};
    for (const [k, v] of Object.entries(env)) {
      saved[k] = Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined;
      process.env[k] = String(v);
    }
    return saved;
  }

  function restoreEnv(saved) {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }

  async function runCell(request) {
    count += 1;
    const filename = `<cell ${count}>`;
    emit({ type: "start", execution_count: count });
    const saved = setEnv(request.env || {});
    capturing = true;
    let failure = null;
    let failed = false;
    try {
      const value = await evaluate(String(request.code ?? ""), filename);
      if (value !== undefined) result(value, true);
    } catch (e) {
      failure = e;
      failed = true;
    }
    flush();
    capturing = false;
    restoreEnv(saved);
    if (failed) emit(errorEvent(failure));
    emit({ type: "end" });
  }

  const queue = [];
  let busy = false;
  async function serve() {
    if (busy) return;
    busy = true;
    while (queue.length > 0) {
      let request;
      try {
        request = JSON.parse(queue.shift());
      } catch (_) {
        continue;
      }
      await runCell(request);
    }
    busy = false;
  }

  let received = "";
  input.setEncoding("utf8");
  input.on("data", (chunk) => {
    received += chunk;
    let nl;
    while ((nl = received.indexOf("\n")) >= 0) {
      queue.push(received.slice(0, nl));
      received = received.slice(nl + 1);
    }
    serve();
  });
  input.on("end", () => process.exit(0));
  emit({ type: "ready", pid: process.pid });
})();
