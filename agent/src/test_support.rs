//! Helpers shared by unit tests that build sysfs/procfs fixture trees.

use std::path::Path;

/// Writes `content` to `root/relative`, creating the directories above it.
pub fn write_fixture(root: &Path, relative: &str, content: &str) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().expect("fixture path has a parent"))
        .expect("fixture dirs");
    std::fs::write(path, content).expect("fixture file");
}
