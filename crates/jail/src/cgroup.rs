//! Control groups (v1) for jails: one group per run in each of the memory, pids,
//! cpu and cpuacct hierarchies (and freezer, for pausing), placed under the
//! server's own group so the machine's accounting still sees the server whole.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers a jail is placed in.
const CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct", "freezer"];

/// Where this server's jail groups live, one directory per controller hierarchy.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    /// `(controller, <hierarchy>/<server's group>/<name>)`; hierarchies that carry
    /// several controllers appear once per controller with the same path.
    bases: Vec<(&'static str, PathBuf)>,
}

/// The limits written into a run's groups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpu_millicores: u32,
}

/// One run's groups. Removed by [`Group::remove`].
#[derive(Debug)]
pub(crate) struct Group {
    dirs: Vec<(&'static str, PathBuf)>,
}

impl Cgroups {
    /// Finds the v1 hierarchies from `/proc/self/mountinfo` and `/proc/self/cgroup`
    /// and creates `<name>` under this process's group in each.
    pub(crate) fn detect(name: &str) -> io::Result<Cgroups> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let mut bases = Vec::new();
        for &controller in CONTROLLERS {
            let (mount_root, mount_point) =
                find_mount(&mountinfo, controller).ok_or_else(|| {
                    io::Error::other(format!(
                        "no cgroup v1 hierarchy with the `{controller}` controller is mounted"
                    ))
                })?;
            let own_path = own_group(&own, controller).unwrap_or("/");
            let relative = own_path
                .strip_prefix(mount_root.as_str())
                .unwrap_or(own_path)
                .trim_start_matches('/');
            let base = Path::new(&mount_point).join(relative).join(name);
            fs::create_dir_all(&base).map_err(|e| {
                io::Error::new(e.kind(), format!("creating {}: {e}", base.display()))
            })?;
            bases.push((controller, base));
        }
        Ok(Cgroups { bases })
    }

    /// Creates the groups for one run and writes its limits.
    pub(crate) fn create(&self, id: &str, limits: GroupLimits) -> io::Result<Group> {
        let mut group = Group { dirs: Vec::new() };
        for (controller, base) in &self.bases {
            let dir = base.join(id);
            let shared = group.dirs.iter().any(|(_, d)| *d == dir);
            if let (false, Err(e)) = (shared, fs::create_dir(&dir)) {
                group.remove();
                return Err(e);
            }
            group.dirs.push((controller, dir));
        }
        if let Err(e) = group.write_limits(limits) {
            group.remove();
            return Err(e);
        }
        Ok(group)
    }

    /// Removes groups left by servers that are no longer running (their names
    /// start with the pid of the server that made them), killing what is inside.
    pub(crate) fn sweep(&self) {
        let me = std::process::id();
        for (_, base) in &self.bases {
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let stale = Group {
                    dirs: vec![("", entry.path())],
                };
                stale.kill_all();
                stale.remove();
            }
        }
    }
}

impl Group {
    fn dir(&self, controller: &str) -> &Path {
        &self
            .dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .expect("every controller has a group")
            .1
    }

    /// New memory and CPU limits for a live group. Memory+swap moves first when
    /// growing and last when shrinking (it may never be below the memory limit).
    pub(crate) fn set_memory_and_cpu(
        &self,
        memory_bytes: u64,
        cpu_millicores: u32,
    ) -> io::Result<()> {
        let memory = self.dir("memory");
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        let current = read_u64(memory, "memory.limit_in_bytes").unwrap_or(0);
        let growing = memory_bytes >= current;
        if growing && memsw.exists() {
            fs::write(&memsw, memory_bytes.to_string())?;
        }
        write(memory, "memory.limit_in_bytes", memory_bytes)?;
        if !growing && memsw.exists() {
            fs::write(&memsw, memory_bytes.to_string())?;
        }
        write(
            self.dir("cpu"),
            "cpu.cfs_quota_us",
            (u64::from(cpu_millicores) * 100).max(1_000),
        )
    }

    fn write_limits(&self, limits: GroupLimits) -> io::Result<()> {
        let memory = self.dir("memory");
        write(memory, "memory.limit_in_bytes", limits.memory_bytes)?;
        // Memory plus swap equal to memory: no swap. Absent without swap accounting.
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            fs::write(&memsw, limits.memory_bytes.to_string())?;
        } else {
            let _ = fs::write(memory.join("memory.swappiness"), "0");
        }
        // The jail's init process counts too.
        write(self.dir("pids"), "pids.max", u64::from(limits.pids) + 1)?;
        let cpu = self.dir("cpu");
        write(cpu, "cpu.cfs_period_us", 100_000)?;
        write(
            cpu,
            "cpu.cfs_quota_us",
            (u64::from(limits.cpu_millicores) * 100).max(1_000),
        )?;
        Ok(())
    }

    /// Moves a process (and so its future children) into every group.
    pub(crate) fn attach(&self, pid: i32) -> io::Result<()> {
        let pid = pid.to_string();
        for (_, dir) in &self.dirs {
            fs::write(dir.join("cgroup.procs"), &pid)
                .map_err(|e| io::Error::new(e.kind(), format!("joining {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// Processes the kernel's OOM killer ended in this group.
    pub(crate) fn oom_kills(&self) -> u64 {
        let text =
            fs::read_to_string(self.dir("memory").join("memory.oom_control")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the memory limit was ever hit (a fallback when `oom_kill` is absent).
    pub(crate) fn memory_limit_hit(&self) -> bool {
        read_u64(self.dir("memory"), "memory.failcnt").unwrap_or(0) > 0
    }

    pub(crate) fn cpu_time(&self) -> Duration {
        Duration::from_nanos(read_u64(self.dir("cpuacct"), "cpuacct.usage").unwrap_or(0))
    }

    /// Freezes or thaws every process in the group (v1 freezer).
    pub(crate) fn set_frozen(&self, frozen: bool) -> io::Result<()> {
        let state = if frozen { "FROZEN" } else { "THAWED" };
        fs::write(self.dir("freezer").join("freezer.state"), state)
    }

    /// Whether every process of the group is frozen (not merely freezing).
    pub(crate) fn is_frozen(&self) -> bool {
        fs::read_to_string(self.dir("freezer").join("freezer.state"))
            .is_ok_and(|s| s.trim() == "FROZEN")
    }

    /// Kills every process still in the groups.
    pub(crate) fn kill_all(&self) {
        for (_, dir) in &self.dirs {
            let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill has no memory effects; a stale pid is harmless here
                // because only processes in the jail's group are listed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Removes the groups, waiting (bounded) for dying processes to leave them.
    pub(crate) fn remove(self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, dir) in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        self.kill_all();
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        warn_unremovable(dir, &e);
                        break;
                    }
                }
            }
        }
    }
}

/// The jail crate has no logger; a group that cannot be removed is reported on
/// stderr once, and swept at the next start.
fn warn_unremovable(dir: &Path, e: &io::Error) {
    eprintln!("sandgate-jail: could not remove {}: {e}", dir.display());
}

fn write(dir: &Path, file: &str, value: u64) -> io::Result<()> {
    fs::write(dir.join(file), value.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("writing {file}={value}: {e}")))
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// `(mount root, mount point)` of the v1 hierarchy carrying `controller`.
fn find_mount(mountinfo: &str, controller: &str) -> Option<(String, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup" {
            return None;
        }
        let super_options = right.nth(1)?;
        if !super_options.split(',').any(|o| o == controller) {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some((fields.get(3)?.to_string(), fields.get(4)?.to_string()))
    })
}

/// This process's group in the hierarchy carrying `controller`.
fn own_group<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchies_are_found_in_mountinfo() {
        let info = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(info, "cpuacct").unwrap().1,
            "/sys/fs/cgroup/cpu,cpuacct"
        );
        assert_eq!(find_mount(info, "memory").unwrap().0, "/");
        assert!(find_mount(info, "pids").is_none());
        let own = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(own_group(own, "memory"), Some("/process_api/abc"));
        assert_eq!(own_group(own, "cpuacct"), Some("/"));
    }
}
