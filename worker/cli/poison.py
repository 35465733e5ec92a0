"""``assistant-worker poison``: placeholder until the poison tooling lands."""

import argparse


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    subparsers.add_parser("poison", help="list, show, replay or purge dead letters")
