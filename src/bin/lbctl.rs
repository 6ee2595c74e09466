//! `lbctl`: the operator's and the sidecar's CLI. See [`lbagent::lbctl`].

fn main() -> std::process::ExitCode {
    lbagent::lbctl::main()
}
