"""The browser: local adapter folders, the local Hugging Face cache, and Hub search."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Input, Label, OptionList, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option

from engine.io.scan import hub_spec_label

from ..messages import AddToCollection, CachedAdaptersListed, HubSearchDone
from ..widgets.adapter_tree import AdapterTree
from .base import VloraScreen


def summary_table(path: Path) -> Table | Text:
    """A short description of an adapter folder from its header (torch-free)."""
    from engine.errors import VloraError
    from engine.io.header import read_adapter_summary

    try:
        s = read_adapter_summary(path)
    except VloraError as exc:
        return Text(f"✗ {exc}", style="bold red")
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("adapter", Path(s.path).name)
    t.add_row("base model", s.base_model or "—")
    t.add_row("rank / alpha", f"r={s.rank}  alpha={s.lora_alpha:g}" + ("  rsLoRA" if s.use_rslora else ""))
    tm = s.target_modules if isinstance(s.target_modules, str) else ", ".join(s.target_modules)
    t.add_row("targets", tm)
    t.add_row("modules", f"{len(s.modules)}  ({', '.join(s.dtypes)})")
    t.add_row("params", f"{s.num_params:,}  ({s.nbytes / 1024:,.0f} KiB)")
    if s.extra_tensors:
        t.add_row("extra", f"{len(s.extra_tensors)} tensors")
    return t


class BrowserScreen(VloraScreen):
    """Find adapters and add them to the working collection."""

    BINDINGS: ClassVar = [
        Binding("a", "add", "Add", tooltip="Add the highlighted adapter or collection to the working collection", id="browser-add"),
        Binding("o", "open", "Open", tooltip="Open the highlighted adapter's detail, or a subspace", id="browser-open"),
        Binding("delete,x", "remove", "Remove", tooltip="Remove the highlighted adapter from the working collection", id="browser-remove"),
        Binding("slash", "search", "Hub search", key_display="/", tooltip="Search the Hugging Face Hub for PEFT adapters", id="browser-search"),
        Binding("r", "reload", "Reload", tooltip="Re-read the folder tree and the HF cache", id="browser-reload"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with TabbedContent(id="sources", initial="local"):
                with TabPane("Local folders", id="local"):
                    yield AdapterTree(self.app.config.start_path, id="tree")
                with TabPane("HF cache", id="cache"):
                    yield Static("Press r to scan the local Hugging Face cache.", id="cache-notice", classes="notice")
                    yield DataTable(id="cache-table", cursor_type="row")
                with TabPane("Hub search", id="hub"):
                    yield Input(placeholder="search PEFT adapters on the Hub, enter to run", id="hub-query")
                    yield Static("", id="hub-notice", classes="notice")
                    yield DataTable(id="hub-table", cursor_type="row")
            with Vertical(id="browser-side"):
                yield Label("Preview", classes="pane-title")
                yield Static("Highlight an adapter folder (◆) to see its config.", id="preview")
                yield Label("Working collection (0)", id="collection-title", classes="pane-title")
                yield OptionList(id="collection-list")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#cache-table", DataTable).add_columns("repo", "revision", "size")
        self.query_one("#hub-table", DataTable).add_columns("repo", "downloads", "likes", "base model")
        self.app.state_signal.subscribe(self, self._on_state)
        self._cache_scanned = False
        self._hub_repos: list[Any] = []
        self._cached: list[Any] = []
        self._refresh_collection()
        self._reroot()
        self.query_one("#tree").focus()

    def _on_state(self, topic: str) -> None:
        if topic == "collection":
            self._refresh_collection()
        elif topic == "root":
            self._reroot()

    def _reroot(self) -> None:
        """Root the folder tree at ``app.browser_root`` (the demo, once built)."""
        root = self.app.browser_root
        tree = self.query_one(AdapterTree)
        if root is not None and Path(root).is_dir() and Path(tree.path) != Path(root):
            tree._kinds.clear()
            tree.path = Path(root)

    def _refresh_collection(self) -> None:
        from engine.io.scan import spec_name

        coll = self.app.collection
        lst = self.query_one("#collection-list", OptionList)
        highlighted = lst.highlighted
        lst.clear_options()
        lst.add_options([Option(f"{i + 1:>2}. {spec_name(s)}", id=s) for i, s in enumerate(coll)])
        if coll:
            lst.highlighted = min(highlighted or 0, len(coll) - 1)
        self.query_one("#collection-title", Label).update(f"Working collection ({len(coll)})")

    # -- local tree ------------------------------------------------------------------
    def _highlighted_path(self) -> Path | None:
        tree = self.query_one(AdapterTree)
        node = tree.cursor_node
        return node.data.path if node is not None and node.data is not None else None

    @on(AdapterTree.NodeHighlighted, "#tree")
    def _tree_highlighted(self, event: AdapterTree.NodeHighlighted) -> None:
        data = event.node.data
        if data is None:
            return
        self._preview(Path(data.path))

    def _preview(self, path: Path) -> None:
        tree = self.query_one(AdapterTree)
        kind = tree.kind_of(path)
        preview = self.query_one("#preview", Static)
        if kind == "adapter":
            preview.update(summary_table(path))
        elif kind == "collection":
            from engine.io.scan import scan_local_adapters

            n = len(scan_local_adapters(path, max_depth=1))
            preview.update(f"▣ {path.name}: a collection of {n} adapter folders.\nEnter or a adds them all.")
        elif kind == "subspace":
            preview.update(f"◇ {path.name}: a saved subspace.\nEnter or o opens it in the subspace view.")
        else:
            preview.update(f"{path.name}/  (space expands)")

    @on(AdapterTree.DirectorySelected, "#tree")
    def _tree_selected(self, event: AdapterTree.DirectorySelected) -> None:
        event.stop()
        path = Path(event.path)
        kind = self.query_one(AdapterTree).kind_of(path)
        if kind in ("adapter", "collection"):
            self._add_path(path)
        elif kind == "subspace":
            self.app.open_subspace(str(path))
        else:
            node = event.node
            node.toggle()

    def _add_path(self, path: Path) -> None:
        from engine.io.scan import is_adapter_dir, scan_local_adapters

        if is_adapter_dir(path):
            self.post_message(AddToCollection([str(path)]))
            return
        found = scan_local_adapters(path, max_depth=1)
        if found:
            self.post_message(AddToCollection([str(p) for p in found]))
        else:
            self.notify(f"{path} holds no adapter folders", title="Nothing to add", severity="warning")

    # -- actions ---------------------------------------------------------------------------
    def _active_tab(self) -> str:
        return self.query_one("#sources", TabbedContent).active

    def action_add(self) -> None:
        tab = self._active_tab()
        if tab == "local":
            path = self._highlighted_path()
            if path is not None:
                self._add_path(path)
        elif tab == "cache":
            row = self.query_one("#cache-table", DataTable).cursor_row
            if 0 <= row < len(self._cached):
                self.post_message(AddToCollection([str(self._cached[row].path)]))
        elif tab == "hub":
            row = self.query_one("#hub-table", DataTable).cursor_row
            if 0 <= row < len(self._hub_repos):
                self.post_message(AddToCollection([hub_spec_label(self._hub_repos[row].repo_id)]))

    def action_open(self) -> None:
        if self.query_one("#collection-list", OptionList).has_focus:
            spec = self._highlighted_member()
            if spec:
                self.app.show_adapter(spec)
            return
        path = self._highlighted_path() if self._active_tab() == "local" else None
        if path is None:
            self.action_add()
            return
        kind = self.query_one(AdapterTree).kind_of(path)
        if kind == "subspace":
            self.app.open_subspace(str(path))
        elif kind == "adapter":
            self.app.show_adapter(str(path))
        else:
            self._add_path(path)

    def _highlighted_member(self) -> str | None:
        lst = self.query_one("#collection-list", OptionList)
        if lst.highlighted is None or lst.option_count == 0:
            return None
        return lst.get_option_at_index(lst.highlighted).id

    @on(OptionList.OptionSelected, "#collection-list")
    def _member_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.app.show_adapter(event.option.id)

    def action_remove(self) -> None:
        spec = self._highlighted_member()
        if spec is None:
            self.notify("The working collection is empty", severity="warning")
            return
        self.app.remove_from_collection(spec)

    def action_search(self) -> None:
        self.query_one("#sources", TabbedContent).active = "hub"
        self.query_one("#hub-query", Input).focus()

    def action_reload(self) -> None:
        tree = self.query_one(AdapterTree)
        tree._kinds.clear()
        tree.reload()
        self._scan_cache()

    # -- HF cache ------------------------------------------------------------------------
    @on(TabbedContent.TabActivated, "#sources")
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "cache" and not self._cache_scanned:
            self._scan_cache()

    def _scan_cache(self) -> None:
        self._cache_scanned = True
        self.query_one("#cache-notice", Static).update("Scanning the local Hugging Face cache…")
        self._list_cache()

    @work(thread=True, exit_on_error=False, group="hub-cache", exclusive=True)
    def _list_cache(self) -> None:
        from engine.io.hub import list_cached_adapters

        self.post_message(CachedAdaptersListed(list_cached_adapters()))

    @on(CachedAdaptersListed)
    def _cache_listed(self, event: CachedAdaptersListed) -> None:
        self._cached = list(event.adapters)
        table = self.query_one("#cache-table", DataTable)
        table.clear()
        for c in self._cached:
            table.add_row(c.repo_id, c.revision[:10], f"{c.size_on_disk / 1024:,.0f} KiB")
        self.query_one("#cache-notice", Static).update(
            f"{len(self._cached)} adapters in the local HF cache; a adds the highlighted one."
            if self._cached else "No adapters in the local Hugging Face cache."
        )

    @on(DataTable.RowSelected, "#cache-table")
    @on(DataTable.RowSelected, "#hub-table")
    def _row_selected(self) -> None:
        self.action_add()

    # -- Hub search ---------------------------------------------------------------------
    @on(Input.Submitted, "#hub-query")
    def _hub_submitted(self, event: Input.Submitted) -> None:
        cfg = self.app.config
        notice = self.query_one("#hub-notice", Static)
        if not cfg.hub_search:
            notice.update("Hub search is turned off for this session.")
            return
        notice.update(f"Searching the Hub for {event.value!r}…")
        self._search_hub(event.value.strip(), cfg.hub_timeout)

    @work(thread=True, exit_on_error=False, group="hub-search", exclusive=True)
    def _search_hub(self, query: str, timeout: float) -> None:
        """Search the Hub; the engine gives up after ``timeout`` seconds, so a dead network never hangs."""
        from engine.io.hub import search_hub_adapters

        try:
            repos, error = search_hub_adapters(query, limit=50, timeout=timeout), None
        except Exception as exc:  # HubError or anything the network throws
            repos, error = [], str(exc)
        self.post_message(HubSearchDone(query, repos, error))

    @on(HubSearchDone)
    def _hub_done(self, event: HubSearchDone) -> None:
        notice = self.query_one("#hub-notice", Static)
        table = self.query_one("#hub-table", DataTable)
        table.clear()
        if event.error:
            notice.update(Text(f"⚠ Hub search unavailable: {event.error}", style="bold"))
            self.notify(event.error, title="Hub search unavailable", severity="warning")
            self._hub_repos = []
            return
        self._hub_repos = list(event.repos)
        for r in self._hub_repos:
            table.add_row(r.repo_id, f"{r.downloads or 0:,}", f"{r.likes or 0:,}", r.base_model or "—")
        notice.update(f"{len(self._hub_repos)} adapters for {event.query!r}; a or enter adds one (hf://…).")
        if self._hub_repos:
            table.focus()
