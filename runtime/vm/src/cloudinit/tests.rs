#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use super::*;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use yaml_rust2::{Yaml, YamlLoader};

type Change<T> = Box<dyn Fn(&mut T)>;

fn user(name: &str, keys: &[&str]) -> SeedUser {
    SeedUser {
        name: name.to_string(),
        ssh_authorized_keys: keys.iter().map(|k| k.to_string()).collect(),
        sudo: true,
        shell: Some("/bin/bash".to_string()),
    }
}

fn nic() -> SeedNic {
    SeedNic {
        mac: "52:54:00:12:34:56".to_string(),
        ipv4: Some(("192.0.2.10/24".to_string(), Some("192.0.2.1".to_string()))),
        ipv6: Some(("2001:db8::10/64".to_string(), Some("2001:db8::1".to_string()))),
        dhcp4: false,
        dhcp6: false,
        dns: vec!["192.0.2.53".to_string(), "2001:db8::53".to_string()],
    }
}

fn input() -> SeedInput {
    SeedInput {
        vm: "web-1".to_string(),
        hostname: "web-1".to_string(),
        users: vec![user("alice", &["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB alice@laptop"])],
        user_data: Some("#cloud-config\npackages: [nginx]\n".to_string()),
        network_config: None,
        nics: vec![nic()],
    }
}

/// YAML as JSON, so documents compare with `json!` literals.
fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => json!(i),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().expect("string key").to_string(), to_json(v)))
                .collect(),
        ),
        other => panic!("unexpected YAML node {other:?}"),
    }
}

fn parse_yaml(doc: &str) -> Value {
    let docs = YamlLoader::load_from_str(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
    assert_eq!(docs.len(), 1, "{doc}");
    let value = to_json(&docs[0]);
    // cloud-init parses with PyYAML (YAML 1.1); when it is installed it
    // must read the document the same way.
    if let Some(py) = pyyaml(doc) {
        assert_eq!(py, value, "PyYAML disagrees on\n{doc}");
    }
    value
}

/// Runs a python3 script; None when python3 or a module it imports is
/// not installed (the check is then skipped), a panic on any other
/// failure, so a broken check cannot pass silently.
fn python(script: &str, stdin: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        return Some(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ModuleNotFoundError"), "python3 failed: {stderr}");
    None
}

fn pyyaml(doc: &str) -> Option<Value> {
    let out = python(
        "import sys, json, yaml\n\
         print(json.dumps(yaml.safe_load(sys.stdin.buffer.read().decode('utf-8'))))",
        doc.as_bytes(),
    )?;
    Some(serde_json::from_slice(&out).unwrap())
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .map(|b| ALPHABET.iter().position(|&a| a == b).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in sextets.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, s)| n | (s << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

/// Splits a multipart document into (headers, decoded body) pairs.
fn parse_multipart(doc: &str) -> Vec<(String, String)> {
    let first = doc.lines().next().unwrap();
    let boundary = first.split("boundary=\"").nth(1).unwrap().trim_end_matches('"');
    let delimiter = format!("\n--{boundary}");
    let (_, rest) = doc.split_once(&delimiter).unwrap();
    let mut parts = Vec::new();
    for chunk in rest.split(&delimiter) {
        if chunk.starts_with("--") {
            assert_eq!(chunk, "--\n");
            break;
        }
        let chunk = chunk.strip_prefix('\n').unwrap();
        let (headers, body) = chunk.split_once("\n\n").unwrap();
        let body = if headers.contains("Content-Transfer-Encoding: base64") {
            String::from_utf8(base64_decode(body)).unwrap()
        } else {
            assert!(headers.contains("Content-Transfer-Encoding: 7bit"));
            body.to_string()
        };
        parts.push((headers.to_string(), body));
    }
    parts
}

/// The parts as Python's email package (cloud-init's MIME reader)
/// decodes them: (content type, text), or None without python3.
fn python_parts(doc: &str) -> Option<Vec<(String, String)>> {
    let out = python(
        "import sys, json, email\n\
         msg = email.message_from_string(sys.stdin.buffer.read().decode('utf-8'))\n\
         parts = [[p.get_content_type(), p.get_payload(decode=True).decode(p.get_content_charset())]\n\
                  for p in msg.walk() if not p.is_multipart()]\n\
         print(json.dumps(parts))",
        doc.as_bytes(),
    )?;
    Some(serde_json::from_slice(&out).unwrap())
}

fn err_field(e: SeedError) -> String {
    match e {
        SeedError::Invalid { field, .. } => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn same_input_same_seed_and_changes_give_new_ids() {
    let a = seed_files(&input()).unwrap();
    assert_eq!(a, seed_files(&input()).unwrap());
    assert!(a.instance_id.starts_with("provd-"));
    let hex = a.instance_id.strip_prefix("provd-").unwrap();
    assert_eq!(hex.len(), 16);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    let changes: Vec<(&str, Change<SeedInput>)> = vec![
        ("user-data", Box::new(|i| i.user_data = Some("#cloud-config\npackages: [git]\n".into()))),
        ("no user-data", Box::new(|i| i.user_data = None)),
        ("vm", Box::new(|i| i.vm = "web-2".into())),
        ("hostname", Box::new(|i| i.hostname = "web-one".into())),
        ("users", Box::new(|i| i.users[0].ssh_authorized_keys.push("ssh-rsa AAAA b".into()))),
        ("sudo", Box::new(|i| i.users[0].sudo = false)),
        ("nics", Box::new(|i| i.nics[0].dhcp4 = true)),
        ("network override", Box::new(|i| i.network_config = Some("version: 2\n".into()))),
    ];
    let mut ids = BTreeSet::from([a.instance_id.clone()]);
    for (what, change) in changes {
        let mut changed = input();
        change(&mut changed);
        let id = seed_files(&changed).unwrap().instance_id;
        assert!(ids.insert(id), "changing {what} kept an instance id");
    }
}

#[test]
fn meta_data_names_the_instance_and_host() {
    let seed = seed_files(&input()).unwrap();
    assert_eq!(
        parse_yaml(&seed.meta_data),
        json!({"instance-id": seed.instance_id, "local-hostname": "web-1"})
    );
}

#[test]
fn users_and_user_data_make_a_multipart() {
    let seed = seed_files(&input()).unwrap();
    assert!(seed.user_data.starts_with("Content-Type: multipart/mixed; boundary=\""));
    let parts = parse_multipart(&seed.user_data);
    assert_eq!(parts.len(), 2);
    assert!(parts[0].0.contains("Content-Type: text/cloud-config; charset=\"utf-8\""));
    assert!(parts[0].0.contains("filename=\"provd.cfg\""));
    assert!(parts[0].1.starts_with("#cloud-config\n"));
    assert_eq!(
        parse_yaml(&parts[0].1),
        json!({
            "hostname": "web-1",
            "preserve_hostname": false,
            "users": [{
                "name": "alice",
                "lock_passwd": true,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB alice@laptop"],
            }],
        })
    );
    assert!(parts[1].0.contains("Content-Type: text/cloud-config;"));
    assert_eq!(parts[1].1, "#cloud-config\npackages: [nginx]\n");

    if let Some(py) = python_parts(&seed.user_data) {
        assert_eq!(
            py,
            vec![
                ("text/cloud-config".to_string(), parts[0].1.clone()),
                ("text/cloud-config".to_string(), parts[1].1.clone()),
            ]
        );
    }
}

#[test]
fn user_part_types_follow_cloud_init_markers() {
    let cases = [
        ("#!/bin/sh\necho hi\n", "text/x-shellscript"),
        ("#cloud-boothook\n#!/bin/sh\n", "text/cloud-boothook"),
        ("#include\nhttps://example.invalid/a\n", "text/x-include-url"),
        ("#include-once\nhttps://example.invalid/a\n", "text/x-include-once-url"),
        ("## template: jinja\n#cloud-config\n", "text/jinja2"),
        ("#cloud-config-archive\n- type: foo\n", "text/cloud-config-archive"),
        ("  #Cloud-Config\nruncmd: []\n", "text/cloud-config"),
    ];
    for (data, mime) in cases {
        let mut i = input();
        i.user_data = Some(data.to_string());
        let seed = seed_files(&i).unwrap();
        let parts = parse_multipart(&seed.user_data);
        assert!(parts[1].0.contains(&format!("Content-Type: {mime};")), "{data:?}");
        assert_eq!(parts[1].1, data);
        if let Some(py) = python_parts(&seed.user_data) {
            assert_eq!(py[1], (mime.to_string(), data.to_string()));
        }
    }
}

#[test]
fn non_ascii_parts_are_base64_and_decode_exactly() {
    let mut i = input();
    let data = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: \"grüße, 世界 🎉\"\n";
    i.user_data = Some(data.to_string());
    i.users[0].ssh_authorized_keys = vec!["ssh-ed25519 AAAA José's key".to_string()];
    let seed = seed_files(&i).unwrap();
    assert!(seed.user_data.is_ascii());
    let parts = parse_multipart(&seed.user_data);
    assert!(parts[0].1.contains("José"));
    assert_eq!(parts[1].1, data);
    if let Some(py) = python_parts(&seed.user_data) {
        assert_eq!(py[0].1, parts[0].1);
        assert_eq!(py[1].1, data);
    }
}

#[test]
fn base64_matches_known_vectors() {
    for (raw, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_lines(raw.as_bytes()), enc);
    }
    let long = vec![0xffu8; 200];
    let enc = base64_lines(&long);
    assert!(enc.lines().all(|l| l.len() <= 76));
    assert_eq!(enc.lines().next().unwrap().len(), 76);
    assert_eq!(base64_decode(&enc), long);
}

#[test]
fn one_source_of_user_data_is_emitted_alone() {
    let mut only_user_data = input();
    only_user_data.users.clear();
    let seed = seed_files(&only_user_data).unwrap();
    assert_eq!(seed.user_data, "#cloud-config\npackages: [nginx]\n");

    let mut only_users = input();
    only_users.user_data = None;
    let seed = seed_files(&only_users).unwrap();
    assert!(seed.user_data.starts_with("#cloud-config\n"));
    assert_eq!(parse_yaml(&seed.user_data)["users"][0]["name"], "alice");

    let mut neither = only_users.clone();
    neither.users.clear();
    let seed = seed_files(&neither).unwrap();
    assert_eq!(
        parse_yaml(&seed.user_data),
        json!({"hostname": "web-1", "preserve_hostname": false})
    );

    let mime = "Content-Type: multipart/mixed; boundary=\"x\"\nMIME-Version: 1.0\n\n--x--\n";
    let mut only_mime = only_user_data.clone();
    only_mime.user_data = Some(mime.to_string());
    assert_eq!(seed_files(&only_mime).unwrap().user_data, mime);
}

#[test]
fn unknown_user_data_is_refused() {
    for data in ["hello\n", "", "echo hi\n#!/bin/sh\n", "# cloud-config\n"] {
        let mut i = input();
        i.user_data = Some(data.to_string());
        let e = seed_files(&i).unwrap_err();
        assert!(e.to_string().starts_with("cloud-init.user-data: "), "{e}");
        i.users.clear();
        assert_eq!(err_field(seed_files(&i).unwrap_err()), "cloud-init.user-data");
    }
    let mut i = input();
    i.user_data = Some("MIME-Version: 1.0\nContent-Type: text/plain\n\nhi\n".to_string());
    assert_eq!(err_field(seed_files(&i).unwrap_err()), "cloud-init.user-data");
}

const HOSTILE: &[&str] = &[
    "plain",
    "with \"double\" and 'single' quotes",
    "back\\slash \\n not a newline",
    "key: value # not a comment",
    "- not a list",
    "[not, a, list]",
    "{not: a map}",
    "&anchor *alias !tag %directive @at `tick` |pipe >fold",
    "yes",
    "no",
    "on",
    "~",
    "null",
    "0x1F",
    "1e3",
    "012",
    "  leading and trailing spaces  ",
    "unicode: grüße 世界 🎉 \u{a0}nbsp",
    "line\u{2028}separator\u{2029}para\u{85}nel",
    "\u{feff}bom",
    "tab\there",
    "ctrl \u{1} \u{7f} \u{9f} \u{1b}[31m",
    "new\nline\r\n",
    "",
];

#[test]
fn quoted_scalars_read_back_exactly() {
    for s in HOSTILE {
        let doc = format!("a: {}\nb:\n  - {}\n", yaml_quote(s), yaml_quote(s));
        assert_eq!(parse_yaml(&doc), json!({"a": s, "b": [s]}), "{s:?}");
    }
}

#[test]
fn hostile_strings_survive_in_user_data_and_meta_data() {
    // Control characters are refused before rendering, so only the rest
    // can reach a document.
    let printable: Vec<&str> = HOSTILE
        .iter()
        .copied()
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
        .collect();
    let mut i = input();
    i.user_data = None;
    i.hostname = printable.join("|");
    i.users = printable
        .iter()
        .enumerate()
        .map(|(n, s)| SeedUser {
            name: format!("{s}{n}"),
            ssh_authorized_keys: vec![format!("ssh-ed25519 AAAA {s}"), s.to_string()],
            sudo: n % 2 == 0,
            shell: Some(s.to_string()),
        })
        .collect();
    let seed = seed_files(&i).unwrap();
    let meta = parse_yaml(&seed.meta_data);
    assert_eq!(meta["local-hostname"], i.hostname.as_str());
    let doc = parse_yaml(&seed.user_data);
    assert_eq!(doc["hostname"], i.hostname.as_str());
    let users = doc["users"].as_array().unwrap();
    assert_eq!(users.len(), i.users.len());
    for (got, want) in users.iter().zip(&i.users) {
        assert_eq!(got["name"], want.name.as_str());
        assert_eq!(got["shell"], want.shell.as_deref().unwrap());
        assert_eq!(got["ssh_authorized_keys"], json!(want.ssh_authorized_keys));
        assert_eq!(got.get("sudo").is_some(), want.sudo);
    }
}

#[test]
fn control_characters_and_duplicates_are_refused_by_field() {
    let mut i = input();
    i.users[0].ssh_authorized_keys.push("ssh-ed25519 AAAA a\nssh-rsa BBBB evil".into());
    assert_eq!(
        err_field(seed_files(&i).unwrap_err()),
        "cloud-init.users[0].ssh_authorized_keys[1]"
    );

    let mut i = input();
    i.users[0].shell = Some("/bin/sh\0".into());
    assert_eq!(err_field(seed_files(&i).unwrap_err()), "cloud-init.users[0].shell");

    let mut i = input();
    i.users.push(i.users[0].clone());
    let e = seed_files(&i).unwrap_err();
    assert_eq!(e.to_string(), "cloud-init.users[1].name: duplicate user alice");

    let mut i = input();
    i.hostname = "web\n1".into();
    assert_eq!(err_field(seed_files(&i).unwrap_err()), "hostname");

    let mut i = input();
    i.vm = String::new();
    assert_eq!(seed_files(&i).unwrap_err().to_string(), "name: must not be empty");
}

#[test]
fn network_config_is_netplan_v2_by_mac() {
    let mut i = input();
    let mut second = nic();
    second.mac = "52:54:00:ab:cd:ef".into();
    second.ipv4 = None;
    second.ipv6 = Some(("2001:db8:1::5/48".into(), None));
    second.dhcp4 = true;
    second.dns.clear();
    i.nics.push(second);
    let seed = seed_files(&i).unwrap();
    assert_eq!(
        parse_yaml(seed.network_config.as_deref().unwrap()),
        json!({
            "version": 2,
            "ethernets": {
                "eth0": {
                    "match": {"macaddress": "52:54:00:12:34:56"},
                    "set-name": "eth0",
                    "dhcp4": false,
                    "dhcp6": false,
                    "addresses": ["192.0.2.10/24", "2001:db8::10/64"],
                    "routes": [
                        {"to": "0.0.0.0/0", "via": "192.0.2.1"},
                        {"to": "::/0", "via": "2001:db8::1"},
                    ],
                    "nameservers": {"addresses": ["192.0.2.53", "2001:db8::53"]},
                },
                "eth1": {
                    "match": {"macaddress": "52:54:00:ab:cd:ef"},
                    "set-name": "eth1",
                    "dhcp4": true,
                    "dhcp6": false,
                    "addresses": ["2001:db8:1::5/48"],
                },
            },
        })
    );
}

#[test]
fn network_override_is_verbatim_and_no_nics_means_no_file() {
    let raw = "network:\n  version: 1\n  config: [] # as given\n";
    let mut i = input();
    i.network_config = Some(raw.to_string());
    // An override replaces the NICs' config without checking them.
    i.nics[0].mac = "not a mac".into();
    assert_eq!(seed_files(&i).unwrap().network_config.as_deref(), Some(raw));

    let mut i = input();
    i.nics.clear();
    assert_eq!(seed_files(&i).unwrap().network_config, None);
}

#[test]
fn bad_nics_are_refused_by_field() {
    let cases: Vec<(Change<SeedNic>, &str)> = vec![
        (Box::new(|n| n.mac = "52:54:00:12:34:5G".into()), "nics[0].mac"),
        (Box::new(|n| n.mac = "52:54:00:12:34:5A".into()), "nics[0].mac"),
        (Box::new(|n| n.mac = "52-54-00-12-34-56".into()), "nics[0].mac"),
        (Box::new(|n| n.ipv4 = Some(("192.0.2.10".into(), None))), "nics[0].ipv4"),
        (Box::new(|n| n.ipv4 = Some(("192.0.2.10/33".into(), None))), "nics[0].ipv4"),
        (Box::new(|n| n.ipv4 = Some(("2001:db8::1/64".into(), None))), "nics[0].ipv4"),
        (
            Box::new(|n| n.ipv4 = Some(("192.0.2.10/24".into(), Some("2001:db8::1".into())))),
            "nics[0].ipv4.gateway",
        ),
        (Box::new(|n| n.ipv6 = Some(("2001:db8::1/129".into(), None))), "nics[0].ipv6"),
        (Box::new(|n| n.ipv6 = Some(("2001:db8::1/+64".into(), None))), "nics[0].ipv6"),
        (Box::new(|n| n.dns.push("dns.example".into())), "nics[0].dns[2]"),
    ];
    for (change, field) in cases {
        let mut i = input();
        change(&mut i.nics[0]);
        assert_eq!(err_field(seed_files(&i).unwrap_err()), field);
    }
    let mut i = input();
    i.nics.push(nic());
    let e = seed_files(&i).unwrap_err();
    assert_eq!(e.to_string(), "nics[1].mac: duplicate MAC address 52:54:00:12:34:56");
}

#[test]
fn oversized_seeds_are_refused() {
    let mut i = input();
    i.user_data = Some(format!("#cloud-config\n#{}\n", "x".repeat(MAX_SEED_BYTES)));
    assert!(matches!(
        seed_files(&i).unwrap_err(),
        SeedError::TooLarge { limit: MAX_SEED_BYTES, .. }
    ));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seed.iso");
    let mut seed = seed_files(&input()).unwrap();
    seed.user_data = "x".repeat(MAX_SEED_BYTES + 1);
    assert!(matches!(write_seed_iso(&seed, &out), Err(SeedError::TooLarge { .. })));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_files(&input()).unwrap();
    // A directory where the image should go: the rename fails.
    let out = dir.path().join("seed.iso");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("kept"), b"x").unwrap();
    let e = write_seed_iso(&seed, &out).unwrap_err();
    assert!(matches!(e, SeedError::Io { .. }), "{e:?}");
    assert_eq!(entries(dir.path()), ["seed.iso"]);
    assert_eq!(entries(&out), ["kept"]);
    // A directory that does not exist.
    let e = write_seed_iso(&seed, &dir.path().join("missing/seed.iso")).unwrap_err();
    assert!(matches!(e, SeedError::Io { .. }), "{e:?}");
    assert_eq!(entries(dir.path()), ["seed.iso"]);
}
