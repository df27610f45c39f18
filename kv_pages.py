"""
kv_pages.py: the host's bookkeeping of a paged KV cache, as vLLM's block manager: which pool pages are free, which each
slot holds (shared pages: how many holders each has), and the page table the model reads them through. sampler.py's
engine drives it (point 4 of its docstring); the model's side is model.setup_cache and model.decode_addressing.
"""
import torch


class Pages:
    """The host's bookkeeping of a paged KV cache (model.setup_cache with page_size P): which pool pages are free and
    which each slot holds, in order (slot s's position p lives in its page p // P at offset p % P). The n samples of a
    prompt hold its full pages (positions < (prompt length // P) * P, the same K/V for all) as one set of pages, each
    with n holders, and every sample holds the call's common prefix (the opening all its prompts share, whole pages);
    the page the prompt ends in and those after it are each sample's own. A page returns to the pool when its last
    holder lets go of it. Changes go to the model's page_table / page_index in flush(), once per host check. Page 0 is
    never handed out: unassigned table entries point at it, so a finished slot that still steps writes there,
    harmlessly."""

    def __init__(self, model, slots):
        self.model, self.size = model, model.page_size
        self.pool = model.page_index.shape[0] - 1  # pages to hand out
        self.free = list(range(self.pool, 0, -1))  # popped from the end: lowest first
        self.held, self.holders = [[] for _ in range(slots)], [0] * (self.pool + 1)  # holders: slots holding each page
        self.rows, self.placed = set(), {}  # to write: slots' table rows; page -> its logical index
        self.prefix = []  # the pages of the opening all of a call's prompts share (Sampler.write_common_prefix)
        self.peak = 0  # the most pages in use at once during the last generate call (grpo.py logs it, bench.py prints it)

    def can_progress(self, n, prompt_len, ahead, longest):
        """Whether the whole pool holds n samples of a prompt of up to prompt_len tokens with `ahead` positions each
        past it (the pages a prompt of L = aP + r tokens takes, a + n * ceil((r + ahead) / P), are at most
        prompt_len // P + n * ceil((P - 1 + ahead) / P)), and one sequence of longest positions: then an empty pool
        always admits the next prompt or preempted sample, and one sequence can always run to its end."""
        group = prompt_len // self.size + n * -(-(self.size - 1 + ahead) // self.size)
        return self.pool >= max(group, -(-longest // self.size))

    def grow(self, slots, length, shared=0):
        """Give each slot the pages for its positions < length -> False, and nothing given, where too few are free. A
        slot that holds nothing yet starts with the common prefix's pages; shared: the slots hold nothing yet (a prompt's
        samples), and their first `shared` pages (the prefix's included) are one set for all."""
        start = [len(self.held[s]) or len(self.prefix) for s in slots]
        shared = max(0, shared - len(self.prefix))  # the prompt's own full pages, past the common prefix
        needs = [max(0, -(-length // self.size) - h - shared) for h in start]
        if shared + sum(needs) > len(self.free):
            return False
        if not shared and not any(needs) and all(self.held[s] for s in slots):
            return True  # most host checks: the pages held already cover `length`, and no table row changes
        for s in slots:
            if not self.held[s]:
                self.held[s] = list(self.prefix)
                for page in self.prefix:
                    self.holders[page] += 1
        for j in range(len(self.prefix), len(self.prefix) + shared):
            page = self.take(j, len(slots))
            for s in slots:
                self.held[s].append(page)
        for s, k in zip(slots, needs):
            for _ in range(k):
                self.held[s].append(self.take(len(self.held[s]), 1))
            self.rows.add(s)
        return True

    def take(self, index, holders):
        """A free page (the lowest), at logical index `index` in each of its `holders` slots."""
        page = self.free.pop()
        self.placed[page], self.holders[page] = index, holders
        self.peak = max(self.peak, self.pool - len(self.free))
        return page

    def hold_prefix(self, k):
        """Take k pages for the common prefix (logical pages 0..k-1 of every sequence), held until drop_prefix."""
        self.prefix = [self.take(j, 1) for j in range(k)]

    def drop_prefix(self):
        """Let go of the common prefix: the model no longer reads its positions as cached (model.cached_prefix)."""
        self.let_go(self.prefix)
        self.prefix = []
        self.model.cached_prefix = 0

    def release(self, slot):
        self.let_go(self.held[slot])
        self.held[slot] = []
        self.rows.add(slot)

    def let_go(self, pages):
        """One holder fewer for each page; a page nobody holds returns to the pool."""
        for page in reversed(pages):
            self.holders[page] -= 1
            if not self.holders[page]:
                self.free.append(page)

    def move(self, running):
        """Slot running[i] -> slot i (the sampler packing), with its pages (a page's logical index stays)."""
        self.held = [self.held[s] for s in running] + [[] for _ in range(len(self.held) - len(running))]
        self.rows.update(range(max(running) + 1))

    def flush(self):
        """Write what changed to the device: the slots' table rows and new pages' logical indices (a copy each)."""
        m = self.model
        if self.rows:
            slots, cols = sorted(self.rows), m.page_table.shape[1]
            rows = torch.tensor([self.held[s] + [0] * (cols - len(self.held[s])) for s in slots])
            m.page_table.index_copy_(0, torch.tensor(slots, device=m.page_table.device), rows.to(m.page_table.device))
        if self.placed:
            pages, index = torch.tensor(list(self.placed)), torch.tensor(list(self.placed.values()))
            m.page_index.index_copy_(0, pages.to(m.page_index.device), index.to(m.page_index.device))
        self.rows, self.placed = set(), {}
