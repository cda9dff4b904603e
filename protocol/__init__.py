"""Everything that crosses a process boundary: messages, sockets, start-up configuration."""
