"""The session engine without I/O: ``SessionMachine`` (``session``), the MTA side in the
client role (``mta``), and the events and actions between the machine and its driver
(``events``). Nothing here imports trio or touches a socket or a clock; docs/machine.md
is the theory of operation."""

from .events import Action, Event, Side
from .mta import MtaConversation
from .session import Counters, Phase, SessionMachine

__all__ = ["Action", "Counters", "Event", "MtaConversation", "Phase", "SessionMachine", "Side"]
