//! `remora-injector`: the admission webhook (`serve`) and offline injection (`inject`).

fn main() {}
