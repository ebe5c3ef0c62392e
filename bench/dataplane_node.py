"""A fake node for the data-plane benchmark: registers with HaloD, points at our server.

    python -m bench.dataplane_node CONTROL NAME BROWSER SP

Owns nothing new: it is bench/control_nodes.py's simulated node (real TCP, the control
protocol over SP pair0, heartbeats, the same stdin/stdout commands), except that its
``register`` message advertises BROWSER (``host:port``) and SP (``tcp://host:port``), the
ports of bench/dataplane_server.py, so HaloD's data plane forwards route ports there.
"""

from __future__ import annotations

import json
import random
import sys

from bench.control_nodes import HEADER, LENGTH, Node, Sim


class AddressedSim(Sim):
    def __init__(self, control: str, names: list[str], browser: str, sp: str) -> None:
        super().__init__(control, names)
        self.browser, self.sp = browser, sp

    def write(self, node: Node, data: bytes) -> None:
        if data.startswith(HEADER):  # Sim.connect's register: advertise our server instead
            body = json.dumps({
                "type": "register", "version": 1, "name": node.name,
                "browser": self.browser, "sp": self.sp, "capacity": 1, "hashes": [1, 2],
            }, separators=(",", ":")).encode()  # fmt: skip
            data = HEADER + LENGTH.pack(len(body)) + body
        super().write(node, data)


def main(argv: list[str]) -> int:
    random.seed()
    control, name, browser, sp = argv
    AddressedSim(control, [name], browser, sp).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
