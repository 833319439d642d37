//! Man pages and shell completions, generated from a binary's clap definition (feature
//! `docgen`), so that what the packages ship always matches the CLI: both binaries have a
//! hidden `generate-docs DIR` command that the packaging runs.
//!
//! Writes `DIR/man/<bin>.1` and one page per subcommand (`<bin>-<sub>.1`), and
//! `DIR/completions/{<bin>.bash, _<bin>, <bin>.fish}`.

use std::io;
use std::path::{Path, PathBuf};

/// Writes every man page and completion of `cmd` under `dir`; returns the files written.
pub fn write_all(mut cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    cmd.build();
    let name = cmd.get_name().to_string();
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut written = Vec::new();
    let mut page = |c: &clap::Command, title: &str| -> io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(c.clone())
            .title(title.to_uppercase())
            .render(&mut out)?;
        let file = format!("{title}.1");
        let path = man.join(file);
        std::fs::write(&path, out)?;
        written.push(path);
        Ok(())
    };
    page(&cmd, &name)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        page(sub, &format!("{name}-{}", sub.get_name()))?;
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, format!("{name}.bash")),
        (clap_complete::Shell::Zsh, format!("_{name}")),
        (clap_complete::Shell::Fish, format!("{name}.fish")),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
        let path = completions.join(file);
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}
