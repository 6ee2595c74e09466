use super::cmdline::{dir_configs, CommandLine};
use super::words::{split, Lookup};
use super::*;

fn no_env(_: &str) -> Lookup {
    Lookup::Unset
}

fn scan_text(text: &str) -> Scan {
    scan(
        text,
        Path::new("/etc/haproxy/haproxy.cfg"),
        &mut Env::new(&no_env),
    )
}

/// (owner, line, host, first, last) of each listener.
fn found(text: &str) -> Vec<(String, usize, Host, u16, u16)> {
    let s = scan_text(text);
    assert!(s.unknown.is_empty(), "{:?}", s.unknown);
    s.listeners
        .into_iter()
        .map(|l| (l.owner, l.line, l.host, l.first_port, l.last_port))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host_of(address: &str) -> Host {
    match parse_address(address, &[], false) {
        Address::Tcp { host, .. } => host,
        other => panic!("{address}: {other:?}"),
    }
}

#[test]
fn words_follow_haproxys_quoting() {
    let env = |name: &str| match name {
        "IP" => Lookup::Value("10.0.0.1".into()),
        "LIST" => Lookup::Value(":80 :81".into()),
        "GONE" => Lookup::Unknown,
        _ => Lookup::Unset,
    };
    let texts =
        |line: &str| -> Vec<String> { split(line, &env).into_iter().map(|w| w.text).collect() };
    assert_eq!(
        texts("  bind :80   ssl\tcrt x # comment"),
        ["bind", ":80", "ssl", "crt", "x"]
    );
    assert_eq!(texts("global#this is the global section"), ["global"]);
    assert_eq!(
        texts(r##"a\ b 'c d' "e f" g\#h '#' "#""##),
        ["a b", "c d", "e f", "g#h", "#", "#"]
    );
    assert_eq!(
        texts(r#"'$IP' "$IP" $IP "${IP}:443""#),
        ["$IP", "10.0.0.1", "$IP", "10.0.0.1:443"]
    );
    assert_eq!(
        texts(r#""${NOPE-127.0.0.2}:1" "${NOPE}:2" "\$IP""#),
        ["127.0.0.2:1", ":2", "$IP"]
    );
    assert_eq!(texts(r#"a"b"'c'd \x41 \\ \q"#), ["abcd", "A", "\\", "\\q"]);
    assert_eq!(
        texts(r#"bind "${LIST[*]}" v6only"#),
        ["bind", ":80", ":81", "v6only"]
    );
    assert_eq!(texts("bind 'open quote"), ["bind", "open quote"]);
    assert_eq!(texts("\"\" x"), ["", "x"]);
    let w = split(r#"bind "${GONE}:443" "$IP""#, &env);
    assert!(
        w[1].uncertain.len() == 1 && w[1].uncertain[0] == (0..0),
        "{w:?}"
    );
    assert!(!w[2].is_uncertain(), "{w:?}");
    assert!(split("", &env).is_empty() && split("   # only", &env).is_empty());
}

#[test]
fn every_bind_form_is_read() {
    let text = "\
global
    stats socket /run/haproxy/admin.sock mode 660 level admin
    stats socket ipv4@127.0.0.1:9999 level admin
    stats timeout 30s

defaults
    mode http

frontend operator_web
    bind :443
    bind *:8443 ssl crt /x.pem
    bind 0.0.0.0:80
    bind [::]:8080
    bind :::8081 v6only
    bind ipv4@1.2.3.4:444
    bind 127.0.0.1:81,127.0.0.1:82
    bind :8000-8010
    bind unix@/run/x.sock
    bind /run/y.sock mode 600
    bind abns@haproxy-peers
    bind quic4@:443
    bind ipv6@:9443
    bind [2001:db8::1]:445
    bind 2001:db8::2:446
    bind localhost:447
    bind tcp@10.0.0.5:448

backend be_x
    server s1 10.0.0.9:80
    bind :1
";
    let want: Vec<(String, usize, Host, u16, u16)> = vec![
        (
            "the stats socket of the global section".into(),
            3,
            Host::Ip(ip("127.0.0.1")),
            9999,
            9999,
        ),
        ("frontend operator_web".into(), 10, Host::AnyV4, 443, 443),
        ("frontend operator_web".into(), 11, Host::AnyV4, 8443, 8443),
        ("frontend operator_web".into(), 12, Host::AnyV4, 80, 80),
        (
            "frontend operator_web".into(),
            13,
            Host::AnyV6 { v6only: false },
            8080,
            8080,
        ),
        (
            "frontend operator_web".into(),
            14,
            Host::AnyV6 { v6only: true },
            8081,
            8081,
        ),
        (
            "frontend operator_web".into(),
            15,
            Host::Ip(ip("1.2.3.4")),
            444,
            444,
        ),
        (
            "frontend operator_web".into(),
            16,
            Host::Ip(ip("127.0.0.1")),
            81,
            81,
        ),
        (
            "frontend operator_web".into(),
            16,
            Host::Ip(ip("127.0.0.1")),
            82,
            82,
        ),
        ("frontend operator_web".into(), 17, Host::AnyV4, 8000, 8010),
        (
            "frontend operator_web".into(),
            22,
            Host::AnyV6 { v6only: false },
            9443,
            9443,
        ),
        (
            "frontend operator_web".into(),
            23,
            Host::Ip(ip("2001:db8::1")),
            445,
            445,
        ),
        (
            "frontend operator_web".into(),
            24,
            Host::Ip(ip("2001:db8::2")),
            446,
            446,
        ),
        (
            "frontend operator_web".into(),
            25,
            Host::Name("localhost".into()),
            447,
            447,
        ),
        (
            "frontend operator_web".into(),
            26,
            Host::Ip(ip("10.0.0.5")),
            448,
            448,
        ),
    ];
    assert_eq!(found(text), want);
}

#[test]
fn sections_that_listen_and_those_that_do_not() {
    let text = "\
listen stats
    mode http
    bind 127.0.0.1:8404
    stats enable
peers mesh
    peer hap1 10.0.0.1:10000
    peer hap2 10.0.0.2:10001
peers mesh2
    bind :10002
    server hap1
    server hap2 10.0.0.2:10002
log-forward syslog
    bind 127.0.0.1:1514
    dgram-bind 127.0.0.1:1514
resolvers dns
    nameserver ns1 10.0.0.53:53
mailers m
    mailer smtp1 10.0.0.25:25
ring r
    server s 10.0.0.6:514
userlist u
    user admin password x
program p
    command /bin/true
cache c
    total-max-size 4
http-errors e
    errorfile 503 /x
";
    let owners: Vec<(String, u16)> = found(text).into_iter().map(|f| (f.0, f.3)).collect();
    assert_eq!(
        owners,
        [
            ("listen stats".to_string(), 8404),
            ("peer hap1 of peers mesh".into(), 10000),
            ("peer hap2 of peers mesh".into(), 10001),
            ("peers mesh2".into(), 10002),
            ("log-forward syslog".into(), 1514),
        ]
    );
}

#[test]
fn comments_conditions_quotes_and_variables() {
    let env = |name: &str| match name {
        "PORT" => Lookup::Value("7001".into()),
        "ADDR" => Lookup::Value("10.1.1.1:7002".into()),
        "UNKNOWN" => Lookup::Unknown,
        "GUESS" => Lookup::Guess("7009".into()),
        _ => Lookup::Unset,
    };
    let text = "\
# frontend commented
#    bind :1
frontend \"quoted name\"   # a comment
    bind :7000 # bind :2
    bind \":${PORT}\"
    bind \"$ADDR\"
    bind \"${UNSET}:7003\"
    bind \"${UNKNOWN}:7004\"
    bind \":${UNKNOWN}\"
    bind fd@${FD}
    bind fd@3
    bind 1.2.3.4
    bind :99999
.if streq(\"$WITH_SSL\",yes)
    bind :7005
.elif defined(X)
    bind :7006
.else
    bind :7007
.endif
    .notice \"bind :3\"
    bind\\ x :4
frontend f2 from defs
\tbind\t:7008
    bind \"127.0.0.1:${GUESS}\"
    bind \":${UNKNOWN-7010}\"
    bind \":${UNSET-7011}\"
";
    let s = scan(text, Path::new("/f.cfg"), &mut Env::new(&env));
    let got: Vec<(String, usize, Host, u16)> = s
        .listeners
        .iter()
        .map(|l| (l.owner.clone(), l.line, l.host.clone(), l.first_port))
        .collect();
    let fe = "frontend quoted name".to_string();
    assert_eq!(
        got,
        [
            (fe.clone(), 4, Host::AnyV4, 7000),
            (fe.clone(), 5, Host::AnyV4, 7001),
            (fe.clone(), 6, Host::Ip(ip("10.1.1.1")), 7002),
            (fe.clone(), 7, Host::AnyV4, 7003),
            (fe.clone(), 8, Host::Unknown, 7004),
            (fe.clone(), 15, Host::AnyV4, 7005),
            (fe.clone(), 17, Host::AnyV4, 7006),
            (fe.clone(), 19, Host::AnyV4, 7007),
            ("frontend f2".into(), 24, Host::AnyV4, 7008),
            // A default of a variable known to be unset is what HAProxy uses.
            ("frontend f2".into(), 27, Host::AnyV4, 7011),
        ]
    );
    // `fd@${FD}` outside quotes is literal text: still an inherited socket. The agent's own
    // value of a variable HAProxy's environment may not share (line 25), and a default of a
    // variable that may be set there (line 26), are no port the agent can trust.
    let lines: Vec<&str> = s.unknown.iter().map(|w| w.as_str()).collect();
    assert_eq!(lines.len(), 7, "{lines:?}");
    for (i, line) in [(5, 25), (6, 26)] {
        assert!(
            lines[i].starts_with(&format!("/f.cfg line {line}: "))
                && lines[i].contains("cannot resolve"),
            "{lines:?}"
        );
    }
    assert!(
        lines[0].starts_with("/f.cfg line 9: ") && lines[0].contains("cannot resolve"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("line 10") && lines[1].contains("fd@"),
        "{lines:?}"
    );
    assert!(
        lines[2].contains("line 11") && lines[2].contains("fd@"),
        "{lines:?}"
    );
    assert!(
        lines[3].contains("line 12") && lines[3].contains("no port"),
        "{lines:?}"
    );
    assert!(
        lines[4].contains("line 13") && lines[4].contains("\"99999\""),
        "{lines:?}"
    );
}

#[test]
fn addresses_that_are_not_tcp_ports() {
    for a in [
        "/run/x.sock",
        "unix@x.sock",
        "abns@x",
        "abnsz@x",
        "uxst@/x",
        "uxdg@/x",
        "sockpair@4",
        "udp@:514",
        "udp4@:514",
        "udp6@:514",
        "quic4@:443",
        "quic6@:443",
        "rhttp@be/srv",
    ] {
        assert_eq!(parse_address(a, &[], false), Address::NotTcp, "{a}");
    }
    for a in [
        "fd@3",
        "weird@:80",
        ":",
        "1.2.3.4",
        "[::1]",
        ":0",
        ":9-1",
        ":80-",
        ":+1",
    ] {
        assert!(
            matches!(parse_address(a, &[], false), Address::Unknown(_)),
            "{a}"
        );
    }
    assert_eq!(host_of("ipv6@:80"), Host::AnyV6 { v6only: false });
    assert_eq!(host_of("tcp6@*:80"), Host::AnyV6 { v6only: false });
    assert_eq!(host_of("mptcp4@:80"), Host::AnyV4);
    assert_eq!(
        host_of("[::ffff:127.0.0.1]:80"),
        Host::Ip(ip("::ffff:127.0.0.1"))
    );
}

#[test]
fn overlap_with_the_agents_bind_address() {
    let any4 = ip("0.0.0.0");
    let any6 = ip("::");
    let lo = ip("127.0.0.1");
    let other = ip("10.0.0.5");
    let v6 = ip("2001:db8::1");
    let dual = Host::AnyV6 { v6only: false };
    let only6 = Host::AnyV6 { v6only: true };
    // (listener host, agent bind, overlaps)
    let cases = [
        (Host::AnyV4, any4, true),
        (Host::AnyV4, lo, true),
        (Host::AnyV4, any6, true),
        (Host::AnyV4, v6, false),
        (dual.clone(), lo, true),
        (dual.clone(), v6, true),
        (only6.clone(), lo, false),
        (only6.clone(), any4, false),
        (only6.clone(), v6, true),
        (only6.clone(), any6, true),
        (Host::Ip(lo), lo, true),
        (Host::Ip(lo), any4, true),
        (Host::Ip(lo), any6, true),
        (Host::Ip(lo), other, false),
        (Host::Ip(ip("::ffff:127.0.0.1")), lo, true),
        (Host::Ip(lo), ip("::ffff:127.0.0.1"), true),
        (Host::Ip(v6), any4, false),
        (Host::Ip(v6), any6, true),
        (Host::Ip(v6), v6, true),
        (Host::Ip(v6), ip("2001:db8::2"), false),
        (Host::Name("lb.example".into()), other, true),
        (Host::Unknown, v6, true),
    ];
    for (host, bind, want) in cases {
        assert_eq!(host.overlaps(bind), want, "{host:?} vs {bind}");
    }
    let l = Listener {
        owner: "frontend operator_web".into(),
        file: "/etc/haproxy/haproxy.cfg".into(),
        line: 23,
        host: Host::AnyV4,
        first_port: 8000,
        last_port: 8010,
    };
    assert!(l.overlaps(lo, 8000) && l.overlaps(lo, 8010) && !l.overlaps(lo, 8011));
    assert_eq!(
        l.to_string(),
        "frontend operator_web in /etc/haproxy/haproxy.cfg line 23"
    );
}

#[test]
fn haproxys_command_line() {
    let args: Vec<String> = [
        "/usr/sbin/haproxy",
        "-Ws",
        "-f",
        "/etc/haproxy/haproxy.cfg",
        "-f",
        "conf.d",
        "-p",
        "/run/haproxy.pid",
        "-S",
        "ipv4@127.0.0.1:9998,level,admin",
        "-S",
        "/run/haproxy-master.sock,mode,660",
        "-S",
        "fd@7",
        "-C",
        "/etc/haproxy",
        "-sf",
        "123",
        "456",
        "-x",
        "/run/haproxy/admin.sock",
        "--",
        "extra.cfg",
    ]
    .map(String::from)
    .to_vec();
    let c = CommandLine::parse(&args);
    assert_eq!(
        c.configs,
        [
            PathBuf::from("/etc/haproxy/haproxy.cfg"),
            "conf.d".into(),
            "extra.cfg".into()
        ]
    );
    assert_eq!(c.chdir, Some(PathBuf::from("/etc/haproxy")));
    assert_eq!(
        c.config_paths(Some(Path::new("/"))),
        [
            Some(PathBuf::from("/etc/haproxy/haproxy.cfg")),
            Some("/etc/haproxy/conf.d".into()),
            Some("/etc/haproxy/extra.cfg".into())
        ]
    );
    let scan = c.master_listeners(Path::new("HAProxy's command line"));
    // An inherited socket's port cannot be told: the caller refuses every new port for it.
    assert_eq!(scan.unknown.len(), 1, "{scan:?}");
    assert!(
        scan.unknown[0].starts_with("HAProxy's command line: HAProxy's master CLI (-S fd@7)")
            && scan.unknown[0].contains("fd@"),
        "{scan:?}"
    );
    let m = scan.listeners;
    assert_eq!(m.len(), 1, "the unix one is no port: {m:?}");
    assert_eq!(
        (m[0].host.clone(), m[0].first_port),
        (Host::Ip(ip("127.0.0.1")), 9998)
    );
    assert_eq!(
        m[0].to_string(),
        "HAProxy's master CLI (-S ipv4@127.0.0.1:9998) (HAProxy's command line)"
    );
    // Without -C, relative paths are HAProxy's working directory's; unknown without one.
    let c = CommandLine::parse(&["haproxy", "-f", "a.cfg", "-f", "/b.cfg"].map(String::from));
    assert_eq!(
        c.config_paths(Some(Path::new("/srv"))),
        [Some("/srv/a.cfg".into()), Some("/b.cfg".into())]
    );
    assert_eq!(c.config_paths(None), [None, Some("/b.cfg".into())]);
    assert_eq!(
        dir_configs(
            [
                "b.cfg",
                "a.cfg",
                ".hidden.cfg",
                "x.cfg.bak",
                "notes",
                "a.cfg.cfg",
                ".cfg"
            ]
            .map(String::from)
            .to_vec()
        ),
        ["a.cfg", "b.cfg"]
    );
}

/// `setenv`, `presetenv`, `unsetenv` and `resetenv` of `global` change what later lines (and
/// later files, through the same [`Env`]) expand, as HAProxy applies them while it reads.
#[test]
fn the_global_sections_environment_changes_are_followed() {
    let base = |name: &str| match name {
        "SET" => Lookup::Value("7100".into()),
        "KEPT" => Lookup::Value("7101".into()),
        "NOBODY" => Lookup::Unknown,
        _ => Lookup::Unset,
    };
    let mut env = Env::new(&base);
    let first = "\
global
    setenv OPPORT 7200
    presetenv SET 1
    presetenv FRESH 7201
    setenv BOTH \"127.0.0.3:${OPPORT}\"
    presetenv NOBODY 7204
frontend operator_web
    bind \"127.0.0.1:${OPPORT}\"
    bind \":${SET}\"
    bind \":${FRESH}\"
    bind \"$BOTH\"
    bind \":${NOBODY}\"
";
    let s = scan(first, Path::new("/a.cfg"), &mut env);
    // Set only if HAProxy's environment lacks it, which is not known.
    assert_eq!(s.unknown.len(), 1, "{:?}", s.unknown);
    assert!(
        s.unknown[0].starts_with("/a.cfg line 12: "),
        "{:?}",
        s.unknown
    );
    let ports: Vec<(Host, u16)> = s
        .listeners
        .iter()
        .map(|l| (l.host.clone(), l.first_port))
        .collect();
    assert_eq!(
        ports,
        [
            (Host::Ip(ip("127.0.0.1")), 7200),
            (Host::AnyV4, 7100),
            (Host::AnyV4, 7201),
            (Host::Ip(ip("127.0.0.3")), 7200),
        ]
    );
    // The next file sees what the first one set; then unsetenv, resetenv (which unsets
    // NOBODY: its presetenv now holds) and a setenv inside an `.if` (the agent does not
    // evaluate conditions: its value is uncertain).
    let second = "\
global
    unsetenv FRESH
    resetenv KEPT OPPORT
.if defined(X)
    setenv MAYBE 7300
.endif
    presetenv NOBODY 7301
listen later
    bind \":${OPPORT}\"
    bind \":${KEPT}\"
    bind \":${FRESH-7202}\"
    bind \":${SET-7203}\"
    bind \":${MAYBE}\"
    bind \":${NOBODY}\"
";
    let s = scan(second, Path::new("/b.cfg"), &mut env);
    let ports: Vec<u16> = s.listeners.iter().map(|l| l.first_port).collect();
    assert_eq!(ports, [7200, 7101, 7202, 7203, 7301]);
    assert_eq!(s.unknown.len(), 1, "{:?}", s.unknown);
    assert!(
        s.unknown[0].starts_with("/b.cfg line 13: "),
        "{:?}",
        s.unknown
    );
}

/// Where an uncertain variable stands decides what is unknown: in the host, only the host; in
/// the port or the address family, the port.
#[test]
fn an_uncertain_part_makes_only_its_part_unknown() {
    let tcp = |a: &str, u: Range<usize>| match parse_address(a, std::slice::from_ref(&u), false) {
        Address::Tcp {
            host, first_port, ..
        } => Some((host, first_port)),
        _ => None,
    };
    assert_eq!(tcp("10.0.0.1:80", 0..8), Some((Host::Unknown, 80)));
    assert_eq!(tcp(":80", 0..0), Some((Host::Unknown, 80)));
    assert_eq!(tcp("[::1]:80", 1..4), Some((Host::Unknown, 80)));
    assert_eq!(
        tcp("[::1]:80", 6..8),
        None,
        "the port of a bracketed address"
    );
    assert_eq!(tcp("10.0.0.1:", 9..9), None, "a port expanded to nothing");
    assert_eq!(tcp("10.0.0.1:443", 9..12), None, "a default port");
    assert_eq!(tcp("ipv4@10.0.0.1:80", 0..4), None, "the family");
    assert_eq!(tcp("ipv4@10.0.0.1:80", 5..13), Some((Host::Unknown, 80)));
}
