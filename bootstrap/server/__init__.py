"""The boot server (`bootstrap serve`): DHCP/ProxyDHCP, TFTP and the HTTP trustless gateway,
each in its own module; `serve.py` wires them into one process."""
