"""`tunegrid`: the customer's command line (httpx and rich only; it never imports the coordinator)."""
