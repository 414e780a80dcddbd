//! `kooagent-install`: installs, upgrades, removes and checks the KooAgent daemon, its
//! configuration, its system user and its boot integration (systemd, SysV init or OpenRC).
//!
//! Every subcommand is idempotent and supports `--dry-run` and `--root DIR`; see
//! docs/operations.md.

mod assets;
mod ops;
mod state_lock;
mod users;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use assets::*;
use ops::{Ctx, Mode, Owner, ROOT};

const USAGE: &str = "\
kooagent-install: install the KooAgent daemon and its boot integration

Usage: kooagent-install <COMMAND> [OPTIONS]

Commands:
  install      install or repair: user, binary, config, state dir, boot integration
  upgrade      replace binary and unit/init script; keep config and state; restart if running
  uninstall    remove binary and boot integration; keep config and state (see --purge)
  status       report what is installed and whether it matches (exit 0: all matches)

Options:
  --root DIR              operate on the tree under DIR, never on this host (no useradd,
                          no systemctl); for images and tests
  --binary PATH           kooagent binary to install (default: `kooagent` next to this program)
  --init systemd|sysv|openrc
                          boot integration (default: detected in the target)
  --dry-run               print every file and command, change nothing
  --no-start              install/upgrade: enable at boot but do not start or restart now
  --config FILE           install: the agent.toml to install (0640 root:kooagent), checked
                          first with the agent's own `kooagent config check`; a bad file
                          changes nothing. Replaces an existing agent.toml
  --no-config-check       with --config, when the binary cannot run here (another
                          architecture): install FILE unchecked
  --purge                 uninstall: also remove /etc/kooagent, /var/lib/kooagent and the user
  -h, --help              this help
  -V, --version           print the version
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cmd {
    Install,
    Upgrade,
    Uninstall,
    Status,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Init {
    Systemd,
    Sysv,
    Openrc,
}

impl Init {
    fn name(self) -> &'static str {
        match self {
            Init::Systemd => "systemd",
            Init::Sysv => "sysv",
            Init::Openrc => "openrc",
        }
    }
}

struct Args {
    cmd: Cmd,
    root: PathBuf,
    binary: Option<PathBuf>,
    init: Option<Init>,
    dry_run: bool,
    no_start: bool,
    purge: bool,
    config: Option<PathBuf>,
    no_config_check: bool,
}

fn parse_args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut cmd = None;
    let mut args = Args {
        cmd: Cmd::Status,
        root: PathBuf::from("/"),
        binary: None,
        init: None,
        dry_run: false,
        no_start: false,
        purge: false,
        config: None,
        no_config_check: false,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("kooagent-install {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Long("root") => args.root = parser.value()?.into(),
            Long("binary") => args.binary = Some(parser.value()?.into()),
            Long("init") => {
                let v = parser.value()?.string()?;
                args.init = Some(match v.as_str() {
                    "systemd" => Init::Systemd,
                    "sysv" => Init::Sysv,
                    "openrc" => Init::Openrc,
                    _ => return Err(format!("--init: unknown init system `{v}`").into()),
                });
            }
            Long("dry-run") => args.dry_run = true,
            Long("no-start") => args.no_start = true,
            Long("purge") => args.purge = true,
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("no-config-check") => args.no_config_check = true,
            Value(v) if cmd.is_none() => {
                let v = v.string()?;
                cmd = Some(match v.as_str() {
                    "install" => Cmd::Install,
                    "upgrade" => Cmd::Upgrade,
                    "uninstall" => Cmd::Uninstall,
                    "status" => Cmd::Status,
                    _ => return Err(format!("unknown command `{v}`").into()),
                });
            }
            _ => return Err(arg.unexpected()),
        }
    }
    args.cmd = cmd.ok_or("missing command (install, upgrade, uninstall or status)")?;
    if args.purge && args.cmd != Cmd::Uninstall {
        return Err("--purge only goes with uninstall".into());
    }
    if args.config.is_some() && args.cmd != Cmd::Install {
        return Err("--config only goes with install".into());
    }
    if args.no_config_check && args.config.is_none() {
        return Err("--no-config-check only goes with --config FILE".into());
    }
    if let Some(c) = &args.config {
        if !c.is_absolute() {
            args.config = Some(std::env::current_dir().map_err(|e| e.to_string())?.join(c));
        }
    }
    if !args.root.is_absolute() {
        args.root = std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join(&args.root);
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kooagent-install: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kooagent-install: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> io::Result<ExitCode> {
    let mode = match (args.cmd, args.dry_run) {
        (Cmd::Status, _) => Mode::Status,
        (_, true) => Mode::DryRun,
        (_, false) => Mode::Apply,
    };
    let mut cx = Ctx::new(args.root.clone(), mode);
    if !args.root.is_dir() {
        return Err(io::Error::other(format!(
            "--root {}: not a directory",
            args.root.display()
        )));
    }
    if mode == Mode::Apply && cx.live && !cx.am_root {
        return Err(io::Error::other(
            "installing on this system needs root (or use --root DIR / --dry-run)",
        ));
    }
    let init = args.init.unwrap_or_else(|| detect_init(&cx));
    let verb = match args.cmd {
        Cmd::Install => "install",
        Cmd::Upgrade => "upgrade",
        Cmd::Uninstall => "uninstall",
        Cmd::Status => "status",
    };
    println!(
        "kooagent-install {verb}: root {}, init {}{}",
        args.root.display(),
        init.name(),
        if args.dry_run { ", dry run" } else { "" }
    );

    let code = match args.cmd {
        Cmd::Install | Cmd::Upgrade => install(&mut cx, args, init)?,
        Cmd::Uninstall => {
            uninstall(&mut cx, args)?;
            ExitCode::SUCCESS
        }
        Cmd::Status => status(&mut cx, args, init)?,
    };

    for n in cx.notes() {
        println!("note: {n}");
    }
    if args.cmd != Cmd::Status {
        match (mode, cx.changes) {
            (Mode::DryRun, 0) => println!("dry run: nothing to do; nothing was written"),
            (Mode::DryRun, n) => {
                println!("dry run: {n} change(s) would be made; nothing was written")
            }
            (_, 0) => println!("{verb}: nothing to do, everything is already in place"),
            (_, n) => println!("{verb}: done, {n} change(s)"),
        }
    }
    Ok(code)
}

/// What an earlier install set up wins (so `status`, `upgrade` and `uninstall` of an image
/// tree need no `--init`); otherwise systemd if it runs (/run/systemd/system) or is the
/// target's init; OpenRC if installed; otherwise SysV init.
fn detect_init(cx: &Ctx) -> Init {
    if cx.p("/usr/lib/systemd/system/kooagent.service").exists() {
        return Init::Systemd;
    }
    if let Ok(script) = std::fs::read_to_string(cx.p("/etc/init.d/kooagent")) {
        let first = script.lines().next().unwrap_or("");
        return if first.contains("openrc-run") {
            Init::Openrc
        } else {
            Init::Sysv
        };
    }
    if cx.p("/run/systemd/system").is_dir() {
        return Init::Systemd;
    }
    if !cx.live {
        // An image tree: /run is empty there, look at what /sbin/init is.
        for init in ["/sbin/init", "/usr/sbin/init"] {
            if let Ok(t) = std::fs::read_link(cx.p(init)) {
                if t.to_string_lossy().contains("systemd") {
                    return Init::Systemd;
                }
            }
        }
    }
    if cx.p("/run/openrc").is_dir()
        || cx.p("/sbin/openrc-run").exists()
        || cx.p("/usr/sbin/openrc-run").exists()
    {
        return Init::Openrc;
    }
    Init::Sysv
}

/// The systemd version of the target: `systemctl --version` on the live system, the name of
/// libsystemd-shared-NNN.so in a tree.
fn systemd_version(cx: &Ctx) -> Option<u32> {
    if cx.live {
        let out = std::process::Command::new("systemctl")
            .arg("--version")
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        return text.split_whitespace().nth(1)?.parse().ok();
    }
    let mut dirs = vec![
        cx.p("/usr/lib/systemd"),
        cx.p("/usr/lib64/systemd"),
        cx.p("/lib/systemd"),
    ];
    if let Ok(rd) = std::fs::read_dir(cx.p("/usr/lib")) {
        dirs.extend(rd.flatten().map(|e| e.path().join("systemd")));
    }
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("libsystemd-shared-")?
                .strip_suffix(".so")?
                .parse()
                .ok()
        })
}

fn binary_source(args: &Args) -> io::Result<PathBuf> {
    if let Some(b) = &args.binary {
        return Ok(b.clone());
    }
    let me = std::env::current_exe()?;
    Ok(me.parent().unwrap_or(Path::new("/")).join("kooagent"))
}

fn read_binary(args: &Args) -> io::Result<Vec<u8>> {
    let src = binary_source(args)?;
    let data = std::fs::read(&src).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read the kooagent binary {} ({e}); pass --binary PATH",
                src.display()
            ),
        )
    })?;
    if !data.starts_with(b"\x7fELF") && !data.starts_with(b"#!") {
        return Err(io::Error::other(format!(
            "{} is not an executable (no ELF header)",
            src.display()
        )));
    }
    Ok(data)
}

/// The largest agent.toml accepted by --config (the agent's own limit is larger; a file this
/// big is a mistake, e.g. the binary given instead of the configuration).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads FILE and has the agent being installed check it (`kooagent config check`), so that
/// the installer and the agent never disagree about what a valid configuration is.
fn checked_config(args: &Args, file: &Path) -> io::Result<Vec<u8>> {
    let what = format!("--config {}", file.display());
    let meta = std::fs::metadata(file)
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}; nothing was changed")))?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return Err(io::Error::other(format!(
            "{what}: not a configuration file (a regular file under 1 MiB); nothing was changed"
        )));
    }
    let data = std::fs::read(file)
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}; nothing was changed")))?;
    if std::str::from_utf8(&data).is_err() {
        return Err(io::Error::other(format!(
            "{what}: not UTF-8 text; nothing was changed"
        )));
    }
    if args.no_config_check {
        println!("  {:<12} {what} (--no-config-check)", "unchecked");
        return Ok(data);
    }
    let binary = binary_source(args)?;
    let out = std::process::Command::new(&binary)
        .args(["config", "check", "--config"])
        .arg(file)
        .env_remove("KOOAGENT_CONFIG")
        .env_remove("KOOAGENT_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::other(format!(
                "{what}: cannot run {} to check it ({e}); check the file with `kooagent config \
                 check --config FILE` where that binary runs, then pass --no-config-check; \
                 nothing was changed",
                binary.display()
            ))
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim().trim_start_matches("kooagent: ");
        // The check runs on this host: a file the configuration names (trusted_keys_file,
        // usage.key_file) is looked up here, not inside the image tree.
        let hint = if args.root != Path::new("/") && why.contains("No such file") {
            " (files the configuration names are looked up on this host, not under --root: \
             put the trusted keys inline, or check the file inside the image and pass \
             --no-config-check)"
        } else {
            ""
        };
        return Err(io::Error::other(format!(
            "{what} is not a valid agent configuration: {why}{hint}; nothing was changed"
        )));
    }
    println!("  {:<12} {what} (kooagent config check)", "checked");
    Ok(data)
}

fn install(cx: &mut Ctx, args: &Args, init: Init) -> io::Result<ExitCode> {
    let upgrade = args.cmd == Cmd::Upgrade;
    if upgrade && !cx.p(BIN).exists() {
        return Err(io::Error::other(format!(
            "{} is not installed under {}; run `kooagent-install install`",
            BIN,
            cx.root.display()
        )));
    }
    let binary = read_binary(args)?;
    // Before any change: a bad configuration refuses the whole install.
    let config = match &args.config {
        Some(file) => Some(checked_config(args, file)?),
        None => None,
    };

    println!("user:");
    ensure_user(cx)?;

    println!("files:");
    let mut restart = cx.file(BIN, &binary, 0o755, ROOT, false)?;
    cx.dir(CONFIG_DIR, 0o755, ROOT)?;
    let had_config = cx.p(CONFIG).exists();
    let config_changed = match &config {
        // The seller's own file replaces what is there (that is what --config asks for).
        Some(data) => cx.file(CONFIG, data, 0o640, Owner("root", GROUP), false)?,
        // The commented template never overwrites an existing configuration.
        None => cx.file(
            CONFIG,
            DEFAULT_CONFIG.as_bytes(),
            0o640,
            Owner("root", GROUP),
            true,
        )?,
    };
    if config_changed && config.is_some() && had_config && cx.live && cx.apply() {
        cx.note(format!(
            "{CONFIG} replaced: a running agent applies it at its next restart \
             (`systemctl restart kooagent` or `/etc/init.d/kooagent restart`)"
        ));
    }
    cx.file(
        MANAGED_UNITS_PATH,
        MANAGED_UNITS.as_bytes(),
        0o644,
        ROOT,
        true,
    )?;
    cx.dir(STATE_DIR, 0o700, Owner(USER, GROUP))?;

    println!("boot integration ({}):", init.name());
    match init {
        Init::Systemd => {
            let mut units = cx.file(UNIT_PATH, UNIT.as_bytes(), 0o644, ROOT, false)?;
            let backoff = systemd_version(cx);
            if backoff.is_some_and(|v| v >= BACKOFF_MIN_SYSTEMD) {
                units |= cx.file(
                    DROPIN_PATH,
                    UNIT_BACKOFF_DROPIN.as_bytes(),
                    0o644,
                    ROOT,
                    false,
                )?;
            } else {
                let why = match backoff {
                    Some(v) => format!("systemd {v} < {BACKOFF_MIN_SYSTEMD}"),
                    None => "systemd version unknown".into(),
                };
                println!("  {:<12} {DROPIN_PATH} ({why}: RestartSteps= unsupported; fixed RestartSec=5s)", "skip");
                if cx.p(DROPIN_DIR).exists() {
                    cx.remove(DROPIN_DIR)?;
                    units = true;
                }
            }
            cx.file(SYSUSERS_PATH, SYSUSERS.as_bytes(), 0o644, ROOT, false)?;
            cx.file(POLKIT_PATH, POLKIT_RULE.as_bytes(), 0o644, ROOT, false)?;
            restart |= units;
            if units {
                cx.run(&["systemctl", "daemon-reload"])?;
            }
            if !upgrade {
                if cx.live {
                    if is_link(cx, WANTS_LINK) {
                        cx.ok("ok", "kooagent.service enabled");
                    } else {
                        cx.run(&["systemctl", "enable", "kooagent.service"])?;
                    }
                } else {
                    // What `systemctl enable` does, done inside the tree.
                    cx.symlink(WANTS_LINK, UNIT_PATH)?;
                }
            }
            start_or_restart(
                cx,
                args,
                upgrade,
                restart,
                &["systemctl", "is-active", "--quiet", "kooagent.service"],
                &["systemctl", "start", "kooagent.service"],
                &["systemctl", "try-restart", "kooagent.service"],
            )?;
        }
        Init::Sysv => {
            restart |= cx.file(INIT_SCRIPT, SYSV_INIT.as_bytes(), 0o755, ROOT, false)?;
            if !upgrade {
                enable_sysv(cx)?;
            }
            start_or_restart(
                cx,
                args,
                upgrade,
                restart,
                &[INIT_SCRIPT, "status"],
                &[INIT_SCRIPT, "start"],
                &[INIT_SCRIPT, "restart"],
            )?;
        }
        Init::Openrc => {
            restart |= cx.file(INIT_SCRIPT, OPENRC_INIT.as_bytes(), 0o755, ROOT, false)?;
            if !upgrade {
                if cx.live && !is_link(cx, OPENRC_LINK) {
                    cx.run(&["rc-update", "add", "kooagent", "default"])?;
                } else {
                    cx.symlink(OPENRC_LINK, INIT_SCRIPT)?;
                }
            }
            start_or_restart(
                cx,
                args,
                upgrade,
                restart,
                &["rc-service", "kooagent", "status"],
                &["rc-service", "kooagent", "start"],
                &["rc-service", "kooagent", "restart"],
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn is_link(cx: &Ctx, abs: &str) -> bool {
    std::fs::symlink_metadata(cx.p(abs)).is_ok_and(|m| m.file_type().is_symlink())
}

/// Install: start unless running. Upgrade: restart only if running and something changed.
fn start_or_restart(
    cx: &mut Ctx,
    args: &Args,
    upgrade: bool,
    changed: bool,
    is_running: &[&str],
    start: &[&str],
    restart: &[&str],
) -> io::Result<()> {
    if args.no_start {
        println!("  {:<12} not starting the service (--no-start)", "skip");
        return Ok(());
    }
    if !cx.live {
        let cmd = if upgrade { restart } else { start };
        cx.run(cmd)?;
        return Ok(());
    }
    let running = cx.probe(is_running).unwrap_or(false);
    if upgrade {
        if running && changed {
            cx.run(restart)?;
        } else {
            cx.ok(
                "ok",
                if running {
                    "service running, nothing changed: no restart"
                } else {
                    "service not running: not started by upgrade"
                },
            );
        }
    } else if running {
        cx.ok("ok", "service running");
    } else {
        cx.run(start)?;
    }
    Ok(())
}

fn enable_sysv(cx: &mut Ctx) -> io::Result<()> {
    let have_links = RC_LINKS.iter().any(|(l, _)| is_link(cx, l));
    if cx.live && !have_links {
        if cx.find_tool("update-rc.d").is_some() {
            cx.run(&["update-rc.d", "kooagent", "defaults"])?;
            return Ok(());
        }
        if cx.find_tool("chkconfig").is_some() {
            cx.run(&["chkconfig", "--add", "kooagent"])?;
            return Ok(());
        }
    }
    if have_links && cx.live {
        cx.ok("ok", "runlevel links present");
        return Ok(());
    }
    let mut any = false;
    for (link, target) in RC_LINKS {
        let dir = Path::new(link)
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if cx.p(&dir).is_dir() {
            cx.symlink(link, target)?;
            any = true;
        }
    }
    if !any {
        cx.note(format!(
            "no /etc/rcN.d directories in {}: hook {INIT_SCRIPT} start into the boot sequence by hand (e.g. /etc/init.d/S99kooagent or rcS)",
            cx.root.display()
        ));
    }
    Ok(())
}

fn nologin(cx: &Ctx) -> String {
    cx.find_tool("nologin")
        .unwrap_or_else(|| "/bin/false".to_string())
}

/// The `kooagent` system user and group: no login shell, no password, no home directory.
fn ensure_user(cx: &mut Ctx) -> io::Result<()> {
    let passwd = cx.p("/etc/passwd");
    let group = cx.p("/etc/group");
    let have_user = users::lookup_id(&passwd, USER).is_some();
    let have_group = users::lookup_id(&group, GROUP).is_some();
    if have_user && have_group {
        cx.ok(
            "ok",
            &format!(
                "user {USER} (uid {}), group {GROUP} (gid {})",
                users::lookup_id(&passwd, USER).unwrap(),
                users::lookup_id(&group, GROUP).unwrap()
            ),
        );
        return Ok(());
    }
    let shell = nologin(cx);
    if cx.live {
        if cx.find_tool("useradd").is_some() {
            if !have_group {
                cx.run(&["groupadd", "--system", GROUP])?;
            }
            if !have_user {
                cx.run(&[
                    "useradd",
                    "--system",
                    "--gid",
                    GROUP,
                    "--no-create-home",
                    "--home-dir",
                    HOME,
                    "--shell",
                    &shell,
                    "--comment",
                    GECOS,
                    USER,
                ])?;
            }
            return Ok(());
        }
        if cx.find_tool("adduser").is_some() && cx.find_tool("addgroup").is_some() {
            // busybox
            if !have_group {
                cx.run(&["addgroup", "-S", GROUP])?;
            }
            if !have_user {
                cx.run(&[
                    "adduser", "-S", "-D", "-H", "-h", HOME, "-s", &shell, "-G", GROUP, "-g",
                    GECOS, USER,
                ])?;
            }
            return Ok(());
        }
        // No tools: edit the files directly, as under --root.
    }
    if !passwd.is_file() || !group.is_file() {
        println!(
            "  {:<12} useradd --system --user-group --no-create-home --home-dir {HOME} --shell {shell} {USER} (no etc/passwd or etc/group under --root)",
            "skip"
        );
        cx.note(format!(
            "create the system user and group `{USER}` in the target before first boot (or let systemd-sysusers do it from {SYSUSERS_PATH})"
        ));
        return Ok(());
    }
    let gid = match users::lookup_id(&group, GROUP) {
        Some(g) => g,
        None => users::free_system_id(&passwd, &group)
            .ok_or_else(|| io::Error::other("no free system id in 100..=999"))?,
    };
    let uid = if !users::has_id(&passwd, gid) {
        gid
    } else {
        users::free_system_id(&passwd, &group)
            .ok_or_else(|| io::Error::other("no free system id in 100..=999"))?
    };
    if !have_group {
        cx.change("add group", &format!("{GROUP} (gid {gid}) to /etc/group"));
        if cx.apply() {
            users::append_line(&group, &format!("{GROUP}:x:{gid}:"))?;
            let gshadow = cx.p("/etc/gshadow");
            if gshadow.is_file() {
                users::append_line(&gshadow, &format!("{GROUP}:!::"))?;
            }
        }
    }
    if !have_user {
        cx.change(
            "add user",
            &format!("{USER} (uid {uid}, shell {shell}, locked password) to /etc/passwd"),
        );
        if cx.apply() {
            users::append_line(
                &passwd,
                &format!("{USER}:x:{uid}:{gid}:{GECOS}:{HOME}:{shell}"),
            )?;
            let shadow = cx.p("/etc/shadow");
            if shadow.is_file() {
                users::append_line(&shadow, &format!("{USER}:!*:::::::"))?;
            }
        }
    }
    Ok(())
}

fn uninstall(cx: &mut Ctx, args: &Args) -> io::Result<()> {
    println!("service:");
    if cx.live {
        if cx.p(UNIT_PATH).exists() && cx.probe(&["systemctl", "--version"]) == Some(true) {
            cx.run(&["systemctl", "disable", "--now", "kooagent.service"])?;
        } else if cx.p(INIT_SCRIPT).exists() {
            let script = std::fs::read_to_string(cx.p(INIT_SCRIPT)).unwrap_or_default();
            if script.starts_with("#!/sbin/openrc-run") {
                cx.run(&["rc-service", "kooagent", "stop"])?;
                if is_link(cx, OPENRC_LINK) {
                    cx.run(&["rc-update", "del", "kooagent", "default"])?;
                }
            } else {
                cx.run(&[INIT_SCRIPT, "stop"])?;
                if cx.find_tool("update-rc.d").is_some() {
                    cx.run(&["update-rc.d", "-f", "kooagent", "remove"])?;
                } else if cx.find_tool("chkconfig").is_some() {
                    cx.run(&["chkconfig", "--del", "kooagent"])?;
                }
            }
        } else {
            cx.ok("ok", "no service installed");
        }
    } else {
        println!(
            "  {:<12} stopping the service (--root: not run on this host)",
            "skip"
        );
    }

    println!("files:");
    let had_unit = cx.p(UNIT_PATH).exists() || cx.p(DROPIN_DIR).exists();
    for abs in [
        WANTS_LINK,
        UNIT_PATH,
        DROPIN_DIR,
        SYSUSERS_PATH,
        POLKIT_PATH,
        OPENRC_LINK,
    ] {
        cx.remove(abs)?;
    }
    for (link, _) in RC_LINKS {
        if is_link(cx, link) {
            cx.remove(link)?;
        }
    }
    cx.remove(INIT_SCRIPT)?;
    cx.remove(BIN)?;
    if had_unit && cx.live && cx.probe(&["systemctl", "--version"]) == Some(true) {
        cx.run(&["systemctl", "daemon-reload"])?;
    }

    if args.purge {
        println!("purge:");
        if let Some(pid) = state_lock::holder(&cx.p(STATE_DIR))? {
            return Err(io::Error::other(format!(
                "{STATE_DIR} is in use by a running agent (pid {pid}); stop it before --purge"
            )));
        }
        cx.remove(CONFIG_DIR)?;
        cx.remove(STATE_DIR)?;
        cx.remove(RUN_DIR)?;
        remove_user(cx)?;
    } else {
        for d in [CONFIG_DIR, STATE_DIR] {
            if cx.p(d).exists() {
                cx.ok("keep", &format!("{d}/ (use --purge to remove)"));
            }
        }
        if users::has_entry(&cx.p("/etc/passwd"), USER) {
            cx.ok("keep", &format!("user {USER} (use --purge to remove)"));
        }
    }
    Ok(())
}

fn remove_user(cx: &mut Ctx) -> io::Result<()> {
    let passwd = cx.p("/etc/passwd");
    let group = cx.p("/etc/group");
    let have_user = users::has_entry(&passwd, USER);
    let have_group = users::has_entry(&group, GROUP);
    if !have_user && !have_group {
        cx.ok("absent", &format!("user/group {USER}"));
        return Ok(());
    }
    if cx.live {
        if cx.find_tool("userdel").is_some() {
            if have_user {
                cx.run(&["userdel", USER])?;
            }
            // userdel may already have removed the user's group.
            let group_left = if cx.apply() {
                users::has_entry(&group, GROUP)
            } else {
                have_group
            };
            if group_left {
                cx.run(&["groupdel", GROUP])?;
            }
            return Ok(());
        }
        if cx.find_tool("deluser").is_some() {
            if have_user {
                cx.run(&["deluser", USER])?;
            }
            if have_group && (!cx.apply() || users::has_entry(&group, GROUP)) {
                cx.run(&["delgroup", GROUP])?;
            }
            return Ok(());
        }
    }
    if have_user {
        cx.change("remove user", &format!("{USER} from /etc/passwd"));
        if cx.apply() {
            users::remove_entry(&passwd, USER)?;
            users::remove_entry(&cx.p("/etc/shadow"), USER)?;
        }
    }
    if have_group {
        cx.change("remove group", &format!("{GROUP} from /etc/group"));
        if cx.apply() {
            users::remove_entry(&group, GROUP)?;
            users::remove_entry(&cx.p("/etc/gshadow"), GROUP)?;
        }
    }
    Ok(())
}

fn status(cx: &mut Ctx, args: &Args, init: Init) -> io::Result<ExitCode> {
    if !cx.p(BIN).exists() {
        println!("  {:<12} {BIN}", "missing");
        let leftovers: Vec<&str> = [CONFIG_DIR, STATE_DIR]
            .into_iter()
            .filter(|d| cx.p(d).exists())
            .collect();
        if leftovers.is_empty() {
            println!("status: not installed");
        } else {
            println!(
                "status: not installed (kept from an earlier install: {})",
                leftovers.join(", ")
            );
        }
        return Ok(ExitCode::from(3));
    }
    let passwd = cx.p("/etc/passwd");
    match users::lookup_id(&passwd, USER) {
        Some(uid) => cx.ok("ok", &format!("user {USER} (uid {uid})")),
        None => cx.change("missing", &format!("user {USER}")),
    }
    // Binary: compare with the one this installer would install, when it is at hand.
    match read_binary(args) {
        Ok(data) => {
            cx.file(BIN, &data, 0o755, ROOT, false)?;
        }
        Err(_) => {
            cx.file(BIN, b"", 0o755, ROOT, true)?;
            println!(
                "  {:<12} no kooagent binary next to the installer: content not compared",
                "note"
            );
        }
    }
    if let Ok(out) = std::process::Command::new(cx.p(BIN))
        .arg("--version")
        .output()
    {
        if out.status.success() {
            println!(
                "  {:<12} {}",
                "version",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    let check = |cx: &mut Ctx, abs: &str, data: &str, mode: u32, owner: Owner, keep| {
        if cx.p(abs).exists() {
            cx.file(abs, data.as_bytes(), mode, owner, keep).map(|_| ())
        } else {
            cx.change("missing", abs);
            Ok(())
        }
    };
    check(
        cx,
        CONFIG,
        DEFAULT_CONFIG,
        0o640,
        Owner("root", GROUP),
        true,
    )?;
    check(cx, MANAGED_UNITS_PATH, MANAGED_UNITS, 0o644, ROOT, true)?;
    if cx.p(STATE_DIR).is_dir() {
        cx.dir(STATE_DIR, 0o700, Owner(USER, GROUP))?;
    } else {
        cx.change("missing", STATE_DIR);
    }
    match init {
        Init::Systemd => {
            check(cx, UNIT_PATH, UNIT, 0o644, ROOT, false)?;
            if systemd_version(cx).is_some_and(|v| v >= BACKOFF_MIN_SYSTEMD) {
                check(cx, DROPIN_PATH, UNIT_BACKOFF_DROPIN, 0o644, ROOT, false)?;
            }
            check(cx, SYSUSERS_PATH, SYSUSERS, 0o644, ROOT, false)?;
            check(cx, POLKIT_PATH, POLKIT_RULE, 0o644, ROOT, false)?;
            if cx.live {
                let enabled = cx.probe(&["systemctl", "is-enabled", "--quiet", "kooagent.service"]);
                let active = cx.probe(&["systemctl", "is-active", "--quiet", "kooagent.service"]);
                println!(
                    "  {:<12} enabled: {}, active: {}",
                    "service",
                    yes_no(enabled),
                    yes_no(active)
                );
            } else if is_link(cx, WANTS_LINK) {
                cx.ok("ok", &format!("{WANTS_LINK} (enabled)"));
            } else {
                cx.change("missing", &format!("{WANTS_LINK} (not enabled)"));
            }
        }
        Init::Sysv | Init::Openrc => {
            let script = if init == Init::Sysv {
                SYSV_INIT
            } else {
                OPENRC_INIT
            };
            check(cx, INIT_SCRIPT, script, 0o755, ROOT, false)?;
            if cx.live {
                let running = cx.probe(&[INIT_SCRIPT, "status"]);
                println!("  {:<12} running: {}", "service", yes_no(running));
            }
        }
    }
    if cx.changes == 0 {
        println!("status: installed ({}), everything matches", init.name());
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "status: installed ({}), {} item(s) missing or different; run `kooagent-install upgrade` or `install` to repair",
            init.name(),
            cx.changes
        );
        Ok(ExitCode::from(1))
    }
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}
