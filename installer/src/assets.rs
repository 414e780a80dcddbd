//! Files the installer writes, embedded at build time so that `kooagent-install` is a single
//! self-contained binary. The packages (.deb/.rpm) ship the very same files.

pub const UNIT: &str = include_str!("../../systemd/kooagent.service");
pub const UNIT_BACKOFF_DROPIN: &str =
    include_str!("../../systemd/kooagent.service.d/restart-backoff.conf");
pub const DEFAULT_CONFIG: &str = include_str!("../../packaging/agent.toml");
pub const MANAGED_UNITS: &str = include_str!("../../packaging/managed-units");
pub const SYSUSERS: &str = include_str!("../../packaging/sysusers/kooagent.conf");
pub const POLKIT_RULE: &str = include_str!("../../packaging/polkit/50-kooagent.rules");
pub const SYSV_INIT: &str = include_str!("../../packaging/sysv/kooagent.init");
pub const OPENRC_INIT: &str = include_str!("../../packaging/openrc/kooagent.openrc");

pub const USER: &str = "kooagent";
pub const GROUP: &str = "kooagent";
pub const GECOS: &str = "KooAgent daemon";
pub const HOME: &str = "/nonexistent";

pub const BIN: &str = "/usr/bin/kooagent";
pub const CONFIG_DIR: &str = "/etc/kooagent";
pub const CONFIG: &str = "/etc/kooagent/agent.toml";
pub const MANAGED_UNITS_PATH: &str = "/etc/kooagent/managed-units";
pub const STATE_DIR: &str = "/var/lib/kooagent";
pub const RUN_DIR: &str = "/run/kooagent";
pub const UNIT_PATH: &str = "/usr/lib/systemd/system/kooagent.service";
pub const DROPIN_DIR: &str = "/usr/lib/systemd/system/kooagent.service.d";
pub const DROPIN_PATH: &str = "/usr/lib/systemd/system/kooagent.service.d/restart-backoff.conf";
pub const WANTS_LINK: &str = "/etc/systemd/system/multi-user.target.wants/kooagent.service";
pub const SYSUSERS_PATH: &str = "/usr/lib/sysusers.d/kooagent.conf";
pub const POLKIT_PATH: &str = "/usr/share/polkit-1/rules.d/50-kooagent.rules";
pub const INIT_SCRIPT: &str = "/etc/init.d/kooagent";
pub const OPENRC_LINK: &str = "/etc/runlevels/default/kooagent";

/// SysV runlevel links, as `update-rc.d kooagent defaults` would create them.
pub const RC_LINKS: &[(&str, &str)] = &[
    ("/etc/rc0.d/K01kooagent", "../init.d/kooagent"),
    ("/etc/rc1.d/K01kooagent", "../init.d/kooagent"),
    ("/etc/rc2.d/S99kooagent", "../init.d/kooagent"),
    ("/etc/rc3.d/S99kooagent", "../init.d/kooagent"),
    ("/etc/rc4.d/S99kooagent", "../init.d/kooagent"),
    ("/etc/rc5.d/S99kooagent", "../init.d/kooagent"),
    ("/etc/rc6.d/K01kooagent", "../init.d/kooagent"),
];

/// First systemd version that knows RestartSteps= and RestartMaxDelaySec=.
pub const BACKOFF_MIN_SYSTEMD: u32 = 254;
