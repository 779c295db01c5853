from slmembed.cli import entry

raise SystemExit(entry())
