//! The `unitgate` binary: check-config names every bad key and exits non-zero; token
//! prints a token whose hash the config accepts.

use std::process::Command;

fn unitgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_unitgate"))
        .args(args)
        .env_remove("UNITGATE_CONFIG")
        .output()
        .expect("run unitgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn default_config_is_refused_until_site_and_tokens_are_set() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let (code, _, err) = unitgate(&["check-config", "--config", path]);
    assert_eq!(code, 1, "{err}");
    for key in ["site.id:", "api.tls_cert:", "api.tls_key:", "api.tokens:"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
}

#[test]
fn a_complete_config_passes_and_a_token_entry_fits_it() {
    let (code, out, _) = unitgate(&[
        "token",
        "--name",
        "cloud",
        "--scopes",
        "read,allocations:write",
    ]);
    assert_eq!(code, 0);
    let entry = &out[out.find("[[api.tokens]]").expect("entry printed")..];
    assert!(
        entry.contains("scopes = [\"read\", \"allocations:write\"]"),
        "{entry}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let text = format!(
        "[site]\nid = \"s1\"\ntimezone = \"Europe/Paris\"\n[store]\ndata_dir = \"{}\"\n[api]\nplain_http = true\n\n{entry}",
        dir.path().display()
    );
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = unitgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with(": ok\n"), "{out}");
}

#[test]
fn bad_values_name_their_keys_and_unknown_keys_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[site]\nid = \"s 1\"\ntimezone = \"Nowhere/Land\"\nauto_occupy_at = \"6am\"\n[site.access_hours]\nfunday = \"closed\"\n[api]\nlisten = \"localhost\"\nplain_http = true\n[[api.tokens]]\nname = \"x\"\nsha256 = \"not-hex\"\nscopes = [\"root\"]\n",
    )
    .unwrap();
    let (code, _, err) = unitgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    for key in [
        "site.id:",
        "site.timezone:",
        "site.access_hours.funday:",
        "site.auto_occupy_at:",
        "api.listen:",
        "api.tokens[0].sha256:",
        "api.tokens[0].scopes:",
    ] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    std::fs::write(&path, "[api]\nlisen = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = unitgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn the_packaged_config_passes_with_no_credentials_and_a_warning() {
    // packaging/config.toml becomes /etc/unitgate/config.toml: valid with no token in it,
    // and check-config says the API refuses everything until one is added.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.toml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("[[api.tokens]]")),
        "a token entry is packaged"
    );
    let (code, out, err) = unitgate(&["check-config", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with(": ok\n"), "{out}");
    assert!(
        err.contains("warning: api.tokens: no API tokens"),
        "no warning in:\n{err}"
    );
}
