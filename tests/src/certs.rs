//! Test certificates made with `openssl`: a CA, and certificates it signs.

use std::path::Path;
use std::process::Command;

use crate::registry::run;
use crate::require;

/// A CA: `<name>.pem` and `<name>.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    require("openssl");
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=shoal-test-{name}"),
        "-keyout",
        &d(&format!("{name}.key")),
        "-out",
        &d(&format!("{name}.pem")),
    ]))
}

/// A certificate `<name>.pem`/`<name>.key` signed by CA `ca`, for `san` (`IP:127.0.0.1`,
/// `DNS:shoal-peer`) and extended key usage `eku` (`serverAuth`, `serverAuth,clientAuth`).
pub fn issue(dir: &Path, ca: &str, name: &str, san: &str, eku: &str) -> anyhow::Result<()> {
    issue_as(dir, ca, name, &format!("/CN={name}"), san, eku)
}

/// As [`issue`], with the certificate's whole subject (`/CN=node-1/OU=seed`).
pub fn issue_as(dir: &Path, ca: &str, name: &str, subject: &str, san: &str, eku: &str) -> anyhow::Result<()> {
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        subject,
        "-keyout",
        &d(&format!("{name}.key")),
        "-out",
        &d(&format!("{name}.csr")),
    ]))?;
    std::fs::write(dir.join(format!("{name}.ext")), format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage={eku}\n"))?;
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &d(&format!("{name}.csr")),
        "-CA",
        &d(&format!("{ca}.pem")),
        "-CAkey",
        &d(&format!("{ca}.key")),
        "-CAcreateserial",
        "-extfile",
        &d(&format!("{name}.ext")),
        "-out",
        &d(&format!("{name}.pem")),
    ]))
}
