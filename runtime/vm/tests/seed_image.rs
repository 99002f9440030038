//! The seed images provd writes, read back by Debian's own tools
//! (`xorriso`, and `isoinfo` where installed): the label, every file's
//! bytes, the modes, and the Joliet and Rock Ridge extensions.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::path::Path;
use std::process::Command;

use provd_tests::seed::read_seed_iso;
use provd_vm::cloudinit::{SeedInput, SeedNic, SeedUser, seed_files, write_seed_iso};

fn input() -> SeedInput {
    SeedInput {
        vm: "web-1".to_string(),
        hostname: "web-1".to_string(),
        users: vec![SeedUser {
            name: "alice".to_string(),
            ssh_authorized_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB alice@laptop".to_string(),
            ],
            sudo: true,
            shell: Some("/bin/bash".to_string()),
        }],
        user_data: Some("#cloud-config\npackages: [nginx]\n".to_string()),
        network_config: None,
        nics: vec![SeedNic {
            mac: "52:54:00:12:34:56".to_string(),
            ipv4: Some(("192.0.2.10/24".to_string(), Some("192.0.2.1".to_string()))),
            ipv6: Some(("2001:db8::10/64".to_string(), Some("2001:db8::1".to_string()))),
            dhcp4: false,
            dhcp6: false,
            dns: vec!["192.0.2.53".to_string(), "2001:db8::53".to_string()],
        }],
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Joliet is a supplementary volume descriptor with a UCS-2 escape
/// sequence; Rock Ridge announces itself in an `ER` entry.
fn assert_joliet_and_rock_ridge(image: &[u8]) {
    let joliet = (16..32).any(|sector| {
        let d = &image[sector * 2048..sector * 2048 + 2048];
        d[0] == 2 && &d[1..6] == b"CD001" && &d[88..90] == b"%/"
    });
    assert!(joliet, "no Joliet volume descriptor");
    let rr = [&b"RRIP_1991A"[..], b"IEEE_P1282", b"IEEE_1282"]
        .iter()
        .any(|id| image.windows(id.len()).any(|w| w == *id));
    assert!(rr, "no Rock Ridge extension record");
}

#[test]
fn iso_round_trip_keeps_label_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for (n, with_net) in [(0, true), (1, false)] {
        let mut i = input();
        i.hostname = "hôte-ünïcode".into();
        if !with_net {
            i.nics.clear();
        }
        let seed = seed_files(&i).unwrap();
        let out = dir.path().join(format!("seed-{n}.iso"));
        let bytes = write_seed_iso(&seed, &out).unwrap();
        assert_eq!(bytes, std::fs::metadata(&out).unwrap().len());

        let (volume, files) = read_seed_iso(&out).unwrap();
        assert_eq!(volume, "cidata");
        let want: Vec<(String, Vec<u8>)> = seed
            .files()
            .into_iter()
            .map(|(name, content)| (name.to_string(), content.as_bytes().to_vec()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(files, want);
        assert_eq!(files.len(), if with_net { 3 } else { 2 });

        let image = std::fs::read(&out).unwrap();
        assert_joliet_and_rock_ridge(&image);
        let listing = Command::new("/usr/bin/xorriso")
            .arg("-indev")
            .arg(format!("stdio:{}", out.display()))
            .args(["-find", "/", "-exec", "lsdl", "--"])
            .output()
            .unwrap();
        let listing = String::from_utf8(listing.stdout).unwrap();
        let modes: Vec<(&str, &str, &str)> = listing
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0], f[2], f[3])
            })
            .collect();
        assert_eq!(modes.len(), files.len() + 1, "{listing}");
        assert_eq!(modes[0], ("dr-xr-xr-x", "0", "0"), "{listing}");
        assert!(modes[1..].iter().all(|m| *m == ("-r--r--r--", "0", "0")), "{listing}");
        if Path::new("/usr/bin/isoinfo").is_file() {
            let info =
                Command::new("/usr/bin/isoinfo").arg("-d").arg("-i").arg(&out).output().unwrap();
            let text = String::from_utf8_lossy(&info.stdout);
            assert!(text.contains("Volume id: cidata"), "{text}");
            assert!(text.contains("Joliet"), "{text}");
            assert!(text.contains("Rock Ridge"), "{text}");
        }
    }
    // Only the images: no staging directory or temporary file is left.
    assert_eq!(entries(dir.path()), ["seed-0.iso", "seed-1.iso"]);

    // Writing again replaces the image.
    let out = dir.path().join("seed-0.iso");
    let mut i = input();
    i.nics.clear();
    let seed = seed_files(&i).unwrap();
    write_seed_iso(&seed, &out).unwrap();
    assert_eq!(read_seed_iso(&out).unwrap().1.len(), 2);
}

#[test]
fn odd_output_directories_work() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_files(&input()).unwrap();
    // A directory whose name a tool's option parser would misread, were it
    // handed the path.
    let odd = dir.path().join("-o=x y");
    std::fs::create_dir(&odd).unwrap();
    let out = odd.join("seed.iso");
    write_seed_iso(&seed, &out).unwrap();
    assert_eq!(read_seed_iso(&out).unwrap().0, "cidata");
    assert_eq!(entries(&odd), ["seed.iso"]);
}

#[test]
fn the_reader_refuses_what_is_not_an_image() {
    // The reader these tests trust must not take a blank file for an empty
    // seed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.iso");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    assert!(read_seed_iso(&path).is_err());
    assert!(read_seed_iso(dir.path()).is_err());
    assert!(read_seed_iso(&dir.path().join("absent.iso")).is_err());
}
