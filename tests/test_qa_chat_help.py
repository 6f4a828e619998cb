"""`flashport chat`'s /help names every mode that /mode accepts (it listed three of the four: thinking-high was
accepted but never shown)."""

from flashport.chat import MODES
from flashport.chat_cli import HELP


def test_help_lists_every_mode():
    listed = HELP.split("/mode ", 1)[1].split()[0].split("|")
    assert listed == list(MODES)
