//! Running PostgreSQL's programs: finding them, and running them as the
//! `postgres` system user when pgwarden runs as root (initdb and postgres refuse
//! to run as root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::ClusterError;

/// Open files the server may hold; `runuser` resets the limit to 1024.
const OPEN_FILES: u32 = 20_000;

/// Where PostgreSQL's server programs are, and who runs them.
#[derive(Debug, Clone)]
pub struct Programs {
    /// folder with initdb, pg_ctl, postgres, pg_basebackup, …
    pub bin: PathBuf,
    /// run through `runuser -u postgres` (we are root)
    as_postgres: bool,
}

impl Programs {
    /// Finds the server programs: `pg_config --bindir`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<Programs, ClusterError> {
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let mut candidates: Vec<PathBuf> = from_pg_config.into_iter().collect();
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort_by_key(|p| {
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            });
            candidates.extend(versions.into_iter().rev());
        }
        let bin = candidates
            .into_iter()
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
            .ok_or_else(|| {
                ClusterError::new(
                    "PostgreSQL server programs (initdb, pg_ctl) not found via `pg_config --bindir` \
                     or in /usr/lib/postgresql/*/bin. Install them, e.g. `apt-get install -y postgresql`",
                )
            })?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        Ok(Programs { bin, as_postgres })
    }

    /// A command running server program `name` with the right user and limits.
    pub fn command(&self, name: &str) -> Command {
        self.command_path(&self.bin.join(name))
    }

    /// A command running `program` with the right user and limits.
    pub fn command_path(&self, program: &Path) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "bash", "-c"])
                .arg(format!(
                    "ulimit -n {OPEN_FILES} 2>/dev/null; exec \"$0\" \"$@\""
                ))
                .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Makes a fresh folder the server user owns.
    pub fn make_dir(&self, path: &Path) -> Result<(), ClusterError> {
        std::fs::create_dir_all(path)
            .map_err(|e| ClusterError::new(format!("cannot create {}: {e}", path.display())))?;
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(path))?;
        }
        run(Command::new("chmod").arg("700").arg(path)).map(|_| ())
    }

    /// Writes a file the server user can read.
    pub fn write_file(&self, path: &Path, contents: &str) -> Result<(), ClusterError> {
        std::fs::write(path, contents)
            .map_err(|e| ClusterError::new(format!("cannot write {}: {e}", path.display())))?;
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(path))?;
        }
        Ok(())
    }
}

/// Runs a command to completion; a failure carries its output.
pub fn run(command: &mut Command) -> Result<Output, ClusterError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::new(format!("cannot run {command:?}: {e}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ClusterError::new(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}
