"""fanpkt: a userspace IPIP data plane for Fan networking."""
__version__ = "0.1.0"
