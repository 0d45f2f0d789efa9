"""The Textual app of ``paddler dashboard`` (the only module that imports Textual).

Keys: ``q`` quits, ``s`` cycles the sort order of the agents, arrows move the
selection and the selected agent's details (issues in full, model, download) show
below the table. What is shown comes from :mod:`paddler_cli.dashboard_view`.
"""

from __future__ import annotations

import asyncio
import contextlib

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Header, Static

from paddler_cli.dashboard_view import (
    AGENT_COLUMNS,
    GROUP_COLUMNS,
    DashboardState,
    Feed,
    agent_detail,
    agent_rows,
    group_rows,
)


class DashboardApp(App[None]):
    """The dashboard of the balancer whose management API is at ``address`` (host:port)."""

    TITLE = "Paddler dashboard"
    CSS = """
    #banner { padding: 0 1; background: $success-darken-2; color: $text; }
    #banner.down { background: $error; }
    #totals { padding: 0 1; height: 1; }
    #agents { height: 1fr; }
    #groups { height: auto; max-height: 8; }
    #detail { height: auto; min-height: 5; padding: 0 1; border: round $primary; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("s", "sort", "Sort"),
    ]

    def __init__(self, address: str) -> None:
        super().__init__()
        self.state = DashboardState(address)
        self.selected: str | None = None
        self._feed_task: asyncio.Task[None] | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Vertical():
            yield Static(id="banner")
            yield Static(id="totals")
            yield DataTable(id="agents", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="groups", cursor_type="none")
            yield Static(id="detail")
        yield Footer()

    def on_mount(self) -> None:
        agents = self.query_one("#agents", DataTable)
        agents.add_columns(*AGENT_COLUMNS)
        self.query_one("#groups", DataTable).add_columns(*GROUP_COLUMNS)
        self.refresh_view()
        feed = Feed(self.state, self.refresh_view)
        self._feed_task = asyncio.get_running_loop().create_task(feed.run(), name="dashboard-feed")

    async def on_unmount(self) -> None:
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task

    def refresh_view(self) -> None:
        state = self.state
        banner = self.query_one("#banner", Static)
        banner.update(Text(state.banner()))
        banner.set_class(state.error is not None, "down")
        self.query_one("#totals", Static).update(Text(state.totals()))
        table = self.query_one("#agents", DataTable)
        rows = agent_rows(state)
        table.clear()
        for key, cells in rows:
            table.add_row(*(Text(cell) for cell in cells), key=key)
        keys = [key for key, _ in rows]
        if keys:
            if self.selected not in keys:
                self.selected = keys[0]
            table.move_cursor(row=keys.index(self.selected), animate=False)
        else:
            self.selected = None
        groups = self.query_one("#groups", DataTable)
        groups.clear()
        for cells in group_rows(state):
            groups.add_row(*(Text(cell) for cell in cells))
        self._show_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "agents" and event.row_key.value is not None:
            self.selected = str(event.row_key.value)
            self._show_detail()

    def _show_detail(self) -> None:
        # A query, not query_one: a row highlight can arrive while the app closes and
        # the panel is already gone (seen in CI as NoMatches during shutdown).
        for panel in self.query("#detail").results(Static):
            panel.update(Text(agent_detail(self.state, self.selected)))

    def action_sort(self) -> None:
        self.state.next_sort()
        self.refresh_view()
