//! `remora-proxy`: the remora sidecar.

fn main() {}
