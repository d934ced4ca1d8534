"""fanpkt: Fan networking in userspace, IPIP and VXLAN.

A Python shell (configuration, devices, plumbing, threads, the `fanpkt` and
`fanpkt-forward` commands) around one compiled data plane, fanpkt._fastpath, which only
fanpkt.engine imports. README.md says how to use it; docs/spec.md what it does.
"""
__version__ = "0.1.0"
