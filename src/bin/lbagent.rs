//! `lbagent`: the daemon. See [`lbagent::daemon`].

fn main() -> std::process::ExitCode {
    lbagent::daemon::main()
}
