//! Scratch directories.

use std::path::{Path, PathBuf};

use crate::Error;

/// A fresh directory under the system temp dir, removed (with everything in
/// it) when dropped, also when a test fails or a bench run is cut short.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory named `taskmill-<name>-<8 random hex digits>`.
    pub fn new(name: &str) -> Result<TempDir, Error> {
        let path = std::env::temp_dir().join(format!(
            "taskmill-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&path).map_err(|source| Error::CreateDir {
            path: path.clone(),
            source,
        })?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
