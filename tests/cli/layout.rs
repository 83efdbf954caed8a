//! The code's layout: no import cycle and no import up the flow, as the
//! crate docs promise (`scripts/check-layout.py` draws the imports).

use std::process::Command;

use crate::util::skip;

#[test]
fn every_import_points_down_the_flow() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-layout.py");
    let out = match Command::new("python3").arg(script).output() {
        Ok(out) => out,
        Err(e) => return skip(format!("python3 is not available to run {script}: {e}")),
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
