//! Template layers: capturing a sandbox's `/workspace` and starting sandboxes on
//! it copy-on-write.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use sandgate_jail::{CaptureError, CaptureLimits, Sandbox, Spec};

mod common;
use common::{jail, run};

const LIMITS: CaptureLimits = CaptureLimits {
    max_bytes: 16 << 20,
    max_entries: 10_000,
};

#[test]
fn a_capture_keeps_files_and_links_as_links_and_skips_special_files() {
    let Some(jail) = jail() else { return };
    let builder = jail.create_sandbox(&Spec::default()).unwrap();
    run(
        &jail,
        &builder,
        "cd /workspace && mkdir -p lib/deep && echo built > built.txt && echo 'x=1' > lib/deep/m.py \
         && chmod 4755 built.txt && ln -s /etc/shadow shadow && ln -s ../../../../../etc/passwd rel \
         && ln -s shadow chain && ln -s /proc/self/root/etc hostetc && mkfifo pipe && \
         touch -d 2001-02-03 lib/deep/m.py",
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");
    let report = builder
        .capture("/workspace", &dest, &LIMITS, 65534, 65534)
        .unwrap();
    assert_eq!(report.skipped, ["FIFO /workspace/pipe"]);
    assert_eq!(report.entries, 8, "{report:?}");

    let meta = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.join("built.txt")).unwrap(),
        "built\n"
    );
    assert_eq!(
        meta("built.txt").mode() & 0o7777,
        0o755,
        "set-id bits dropped"
    );
    assert_eq!((meta("built.txt").uid(), meta("lib").gid()), (65534, 65534));
    assert_eq!(meta("lib/deep/m.py").mtime(), 981_158_400);
    for link in ["shadow", "rel", "chain", "hostetc"] {
        assert!(meta(link).file_type().is_symlink(), "{link} kept as a link");
        assert_eq!(meta(link).uid(), 65534);
    }
    assert_eq!(
        std::fs::read_link(dest.join("shadow")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert!(!dest.join("pipe").exists());
    assert!(
        !std::fs::read_dir(&dest)
            .unwrap()
            .flatten()
            .any(|e| e.file_type().unwrap().is_fifo())
    );
    drop(builder);

    // Sandboxes on the layer: the files are there, the links resolve inside.
    let a = jail.create_sandbox_on(&Spec::default(), &dest).unwrap();
    assert_eq!(
        run(
            &jail,
            &a,
            "cat /workspace/built.txt /workspace/lib/deep/m.py; id -u; stat -c %U /workspace"
        ),
        "built\nx=1\n65534\nsandbox\n"
    );
    let out = run(
        &jail,
        &a,
        "cd /workspace; cat shadow chain 2>&1; head -c 7 rel; echo; ls hostetc | head -3",
    );
    assert!(out.contains("No such file"), "{out}");
    assert!(out.contains("root:x:") && !out.contains("daemon"), "{out}");
    // Writes, deletes and renames stay in this sandbox.
    run(
        &jail,
        &a,
        "cd /workspace && echo changed > built.txt && rm lib/deep/m.py && echo new > new.txt && \
         mkdir more && cp -r lib more/",
    );
    let b = jail.create_sandbox_on(&Spec::default(), &dest).unwrap();
    assert_eq!(
        run(
            &jail,
            &b,
            "cat /workspace/built.txt /workspace/lib/deep/m.py; ls /workspace"
        ),
        "built\nx=1\nbuilt.txt\nchain\nhostetc\nlib\nrel\nshadow\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("built.txt")).unwrap(),
        "built\n"
    );
    assert!(dest.join("lib/deep/m.py").exists() && !dest.join("new.txt").exists());
    // The files API sees the merged view.
    match a
        .read_path(
            "/workspace/new.txt",
            100,
            sandgate_jail::FsUser {
                uid: 65534,
                gid: 65534,
            },
        )
        .unwrap()
    {
        sandgate_jail::FileContent::File(bytes) => assert_eq!(bytes, b"new\n"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_capture_over_its_caps_leaves_nothing_behind() {
    let Some(jail) = jail() else { return };
    let builder = jail.create_sandbox(&Spec::default()).unwrap();
    // Sparse files: little tmpfs space, but every byte would be copied.
    run(
        &jail,
        &builder,
        "cd /workspace && truncate -s 6M a && truncate -s 6M b && truncate -s 6M c",
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");
    let err = builder
        .capture("/workspace", &dest, &LIMITS, 65534, 65534)
        .unwrap_err();
    assert!(matches!(err, CaptureError::TooLarge { .. }), "{err}");
    assert!(!dest.exists());
    let few = CaptureLimits {
        max_bytes: 1 << 30,
        max_entries: 2,
    };
    let err = builder
        .capture("/workspace", &dest, &few, 65534, 65534)
        .unwrap_err();
    assert!(matches!(err, CaptureError::TooManyEntries { .. }), "{err}");
    assert!(!dest.exists());
    // The sandbox is thawed again afterwards.
    assert_eq!(run(&jail, &builder, "echo alive"), "alive\n");
}

/// Prints what a start costs with and without a layer (not asserted: timing).
#[test]
fn starting_on_a_layer_copies_nothing() {
    let Some(jail) = jail() else { return };
    let builder = jail.create_sandbox(&Spec::default()).unwrap();
    run(
        &jail,
        &builder,
        "cd /workspace && for i in $(seq 100); do head -c 100000 /dev/urandom > f$i; done",
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");
    let report = builder
        .capture("/workspace", &dest, &LIMITS, 65534, 65534)
        .unwrap();
    assert_eq!(report.bytes, 100 * 100_000);
    let time = |f: &dyn Fn() -> Sandbox| {
        let mut times: Vec<Duration> = (0..10)
            .map(|_| {
                let t = Instant::now();
                let s = f();
                let e = t.elapsed();
                drop(s);
                e
            })
            .collect();
        times.sort();
        times[5]
    };
    let plain = time(&|| jail.create_sandbox(&Spec::default()).unwrap());
    let layered = time(&|| jail.create_sandbox_on(&Spec::default(), &dest).unwrap());
    eprintln!("sandbox start p50: plain {plain:?}, on a 10 MB layer {layered:?}");
    let s = jail.create_sandbox_on(&Spec::default(), &dest).unwrap();
    // Nothing was copied into the sandbox's tmpfs.
    let used = run(&jail, &s, "df -k --output=used /workspace | tail -1");
    assert!(used.trim().parse::<u64>().unwrap() < 1000, "{used}");
    assert_eq!(run(&jail, &s, "ls /workspace | wc -l"), "100\n");
}
