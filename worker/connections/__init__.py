"""Azure clients built from the storage connections the settings name, and the process's one
Azure credential (``clients.py``), sending through a transport that counts each request
(``counting.py``)."""
