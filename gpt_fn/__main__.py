"""`python -m gpt_fn ...` is the `gpt-fn` command; torchrun launches it the same way:

torchrun --standalone --nproc-per-node 2 -m gpt_fn train [flags]

The command's code (torch and the rest) is imported here, inside `main`, so a Ctrl-C during
the seconds that takes is one line and exit 130 like a Ctrl-C anywhere else.
"""

import sys


def main() -> int:
    try:
        from gpt_fn import cli
    except KeyboardInterrupt:
        print("gpt-fn: interrupted", file=sys.stderr)
        return 130
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
