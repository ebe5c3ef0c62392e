"""etcd v3 for HaloD: the JSON gateway's messages (wire, sans-I/O), a non-blocking client on
Twisted's HTTP client (client), and leader election with a lease (election)."""
