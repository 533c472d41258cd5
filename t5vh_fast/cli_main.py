"""``python -m t5vh_fast.cli_main COMMAND ...``: run a console command without its script installed."""

import sys

from . import cli

COMMANDS = {
    "t5vh-export": cli.export_command,
    "t5vh-demo": cli.demo_command,
    "t5vh-sample": cli.sample_command,
    "t5vh-score": cli.score_command,
    "t5vh-bench": cli.bench_command,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m t5vh_fast.cli_main {{{','.join(COMMANDS)}}} ...")
    command = COMMANDS[sys.argv[1]]
    command.main(args=sys.argv[2:], prog_name=sys.argv[1])
