# Sourced by the benchmark scripts: loopback ports for the servers they start.

# free_port -> a port nothing listens on now (the kernel's pick)
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_port PORT TRIES: returns once 127.0.0.1:PORT takes connections, or
# after TRIES tries 0.1 s apart (the caller's next step then fails)
wait_port() {
    for _ in $(seq "$2"); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.1)" 2>/dev/null && return
        sleep 0.1
    done
}
