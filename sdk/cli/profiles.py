"""``edgeopt profiles``."""

from __future__ import annotations

import json

import click

from edgeopt.cli.render import print_profile, print_profiles
from edgeopt.profiles import load_profile, profile_names


@click.group("profiles", invoke_without_command=True)
@click.pass_context
def profiles_cmd(ctx: click.Context) -> None:
    """List and show hardware profiles (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@profiles_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool = False) -> None:
    """All shipped profiles."""
    profiles = [load_profile(n).to_json() for n in profile_names()]
    click.echo(json.dumps(profiles, indent=2)) if as_json else print_profiles(profiles)


@profiles_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_cmd(name: str, as_json: bool) -> None:
    """One profile by NAME (or a profile .toml path)."""
    profile = load_profile(name).to_json()
    click.echo(json.dumps(profile, indent=2)) if as_json else print_profile(profile)
