//! The languages a program may be written in, and how each is started in a jail:
//! the interpreter, the file the code is written to, and a small prelude that
//! makes `data` visible and hands a top-level `result` back.
//!
//! The prelude reports `result` on file descriptor 3 (a pipe the runner reads), so
//! the program's own stdout and stderr stay exactly what it printed.

use std::process::Command;
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::Serialize;

/// Where a run's files live inside the jail.
pub const SANDBOX_DIR: &str = "/sandbox";
pub const DATA_FILE: &str = "/sandbox/data.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Language {
    pub name: &'static str,
    /// The interpreter, an absolute path inside the jail (the host's, bound read-only).
    pub interpreter: &'static str,
    /// Where the user's code is written.
    pub code_file: &'static str,
    /// Written beside the code and run instead of it, when the language has one.
    pub prelude: Option<(&'static str, &'static str)>,
    /// File extensions that select this language (`sandgate run FILE`).
    pub extensions: &'static [&'static str],
}

pub const LANGUAGES: &[Language] = &[
    Language {
        name: "python",
        interpreter: "/usr/bin/python3",
        code_file: "/sandbox/main.py",
        prelude: Some(("/sandbox/.prelude.py", PYTHON_PRELUDE)),
        extensions: &["py"],
    },
    Language {
        name: "javascript",
        interpreter: "/usr/bin/node",
        code_file: "/sandbox/main.js",
        prelude: Some(("/sandbox/.prelude.js", JAVASCRIPT_PRELUDE)),
        extensions: &["js", "mjs", "cjs"],
    },
    Language {
        name: "bash",
        interpreter: "/bin/bash",
        code_file: "/sandbox/main.sh",
        prelude: None,
        extensions: &["sh", "bash"],
    },
];

pub fn find(name: &str) -> Option<&'static Language> {
    LANGUAGES.iter().find(|l| l.name == name)
}

impl Language {
    /// The command line that runs the program inside the jail.
    pub fn argv(&self) -> Vec<String> {
        let script = self.prelude.map_or(self.code_file, |(path, _)| path);
        let mut argv = vec![self.interpreter.to_owned()];
        if self.name == "python" {
            // No user site-packages, no writing .pyc files into the sandbox.
            argv.extend(["-s".to_owned(), "-B".to_owned()]);
        }
        argv.push(script.to_owned());
        argv
    }

    /// The interpreter's version, asked once.
    pub fn version(&self) -> &'static str {
        static VERSIONS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
        let versions = VERSIONS.get_or_init(|| {
            LANGUAGES
                .iter()
                .map(|l| (l.name, probe_version(l)))
                .collect()
        });
        versions
            .iter()
            .find(|(n, _)| *n == self.name)
            .map_or("unknown", |(_, v)| v.as_str())
    }
}

fn probe_version(l: &Language) -> String {
    let out = match l.name {
        "bash" => Command::new(l.interpreter)
            .args(["-c", "echo $BASH_VERSION"])
            .output(),
        _ => Command::new(l.interpreter).arg("--version").output(),
    };
    let Ok(out) = out else {
        return "unavailable".to_owned();
    };
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    // "Python 3.11.2", "v20.20.2", "5.2.15(1)-release"
    text.split_whitespace()
        .find(|w| {
            w.trim_start_matches('v')
                .starts_with(|c: char| c.is_ascii_digit())
        })
        .map(|w| {
            w.trim_start_matches('v')
                .split('(')
                .next()
                .unwrap_or(w)
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `GET /v1/languages` entries.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct LanguageInfo {
    pub name: &'static str,
    pub version: &'static str,
}

pub fn catalogue() -> Vec<LanguageInfo> {
    LANGUAGES
        .iter()
        .map(|l| LanguageInfo {
            name: l.name,
            version: l.version(),
        })
        .collect()
}

/// Runs `/sandbox/main.py` as `__main__` with `data` defined; reports `result` on fd 3.
const PYTHON_PRELUDE: &str = r#"import os as _sg_os, sys as _sg_sys
def _sg_report(ns):
    # json is imported only when there is something to encode: it costs milliseconds.
    if "result" not in ns:
        return
    import json
    try:
        text = json.dumps(ns["result"])
    except (TypeError, ValueError):
        return
    try:
        with _sg_os.fdopen(3, "w") as out:
            out.write(text)
    except OSError:
        pass
def _sg_main():
    data = None
    if _sg_os.path.exists("/sandbox/data.json"):
        import json
        with open("/sandbox/data.json") as f:
            data = json.load(f)
    ns = {"__name__": "__main__", "__builtins__": __builtins__, "data": data}
    with open("/sandbox/main.py") as f:
        source = f.read()
    _sg_sys.argv = ["main.py"]
    try:
        exec(compile(source, "main.py", "exec"), ns)
    except SystemExit:
        _sg_report(ns)
        raise
    except BaseException:
        import traceback
        exc_type, exc, tb = _sg_sys.exc_info()
        traceback.print_exception(exc_type, exc, tb.tb_next)
        _sg_sys.stderr.flush()
        _sg_sys.exit(1)
    _sg_report(ns)
_sg_main()
"#;

/// Runs `/sandbox/main.js` as a script with `data` and `require` defined; reports
/// `result` (a `var`, `let` or `const` at top level) on fd 3 when the process exits.
const JAVASCRIPT_PRELUDE: &str = r#""use strict";
const _sgFs = require("fs");
const _sgVm = require("vm");
let _sgData = null;
try { _sgData = JSON.parse(_sgFs.readFileSync("/sandbox/data.json", "utf8")); } catch (e) { if (e.code !== "ENOENT") throw e; }
globalThis.data = _sgData;
globalThis.require = require;
globalThis.module = module;
globalThis.exports = module.exports;
process.argv = [process.argv[0], "main.js"];
process.on("exit", () => {
  let value;
  try { value = _sgVm.runInThisContext("typeof result === 'undefined' ? undefined : result"); } catch { return; }
  if (value === undefined || typeof value === "function") return;
  let text;
  try { text = JSON.stringify(value); } catch { return; }
  if (text === undefined) return;
  try { _sgFs.writeSync(3, text); } catch {}
});
try {
  _sgVm.runInThisContext(_sgFs.readFileSync("/sandbox/main.js", "utf8"), { filename: "main.js" });
} catch (e) {
  const own = (line) => !line.includes("/sandbox/.prelude.js") && !line.includes("node:internal") && !line.includes("node:vm");
  const text = e && e.stack ? String(e.stack).split("\n").filter(own).join("\n") : String(e);
  process.stderr.write(text + "\n");
  process.exit(1);
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_languages_exist_with_versions() {
        for name in ["python", "javascript", "bash"] {
            let l = find(name).unwrap();
            let v = l.version();
            assert!(v.starts_with(|c: char| c.is_ascii_digit()), "{name}: {v}");
        }
        assert!(find("cobol").is_none());
        assert_eq!(
            find("python").unwrap().argv().last().unwrap(),
            "/sandbox/.prelude.py"
        );
    }
}
