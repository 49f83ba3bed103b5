"""A depth-bounded suffix tree with occurrence counts, grown one token at a time.

SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
Applications", arXiv 2411.04975) indexes every suffix of a text, up to `max_depth` tokens deep,
in a trie whose nodes count how often their path occurs. The path of a node is a substring s;
its children are the tokens that followed s, and `count(child) / total(node)` is the empirical
probability of that next token.

Appending a token costs O(max_depth): the tree keeps the nodes of the text's current suffixes
(`active`, shortest first) and extends each by the new token. Nothing is rebuilt per round.

Nodes are integer ids into flat arrays, and each node's children a dict of ints. Such dicts and
arrays hold no object references, so Python's cyclic garbage collector does not track them: a
tree of a million nodes costs it nothing, where as many small objects would make every
collection in a torch-sized process scan them (about ten times the cost of indexing).
"""

from __future__ import annotations

from array import array

ROOT = 0


class SuffixTree:
    """All substrings of up to `max_depth` tokens of one or more documents, with their counts.

    `extend(token)` appends to the current document; `close()` ends it, so that suffixes of the
    next document do not run across the border. `remove_last(n)` undoes the last n appends and
    `remove_document(tokens)` a closed document.
    """

    def __init__(self, max_depth: int = 32):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.children: list[dict[int, int] | None] = [None]  # node -> {next token: child node}
        self.count = array("q", [0])  # node -> occurrences of its substring s
        self.total = array("q", [0])  # node -> occurrences of s followed by a token (children's counts)
        self.best = array("q", [-1])  # node -> its most frequent next token (ties: the most recent)
        self.free: list[int] = []  # ids of removed nodes, reused first
        self.tokens: list[int] = []  # the current document
        self.active: list[int] = []  # active[m - 1] = node of tokens[-m:], for m = 1..max_depth
        self.size = 0  # tokens indexed, over all documents

    # ---- reading -------------------------------------------------------------------------------
    def child(self, node: int, token: int) -> int | None:
        kids = self.children[node]
        return None if kids is None else kids.get(token)

    def next_token(self, node: int) -> tuple[int, float] | None:
        """The most frequent token after the node's substring and its empirical probability."""
        total = self.total[node]
        if total == 0:
            return None
        token = self.best[node]
        return token, self.count[self.children[node][token]] / total

    def find(self, path) -> int | None:
        node = ROOT
        for token in path:
            node = self.child(node, token)
            if node is None:
                return None
        return node

    def suffix_nodes(self, tokens: list[int]) -> list[int]:
        """Nodes of tokens[-m:] for m = 1.. while they exist (at most max_depth)."""
        found: list[int] = []
        for m in range(1, min(self.max_depth, len(tokens)) + 1):
            node = self.find(tokens[-m:])
            if node is None:
                break
            found.append(node)
        return found

    def follow(self, matches: list[int], token: int) -> list[int]:
        """Given the nodes of a context's suffixes (shortest first), those after appending `token`.

        Used to track a context in a tree that does not index it (the corpus of earlier outputs).
        The set of suffixes present is closed under shortening, so the first miss ends the list.
        """
        grown: list[int] = []
        for node in [ROOT, *matches[: self.max_depth - 1]]:
            child = self.child(node, token)
            if child is None:
                break
            grown.append(child)
        return grown

    # ---- growing -------------------------------------------------------------------------------
    def extend(self, token: int) -> None:
        """Append one token to the current document: O(max_depth).

        Each suffix s of the text so far (and the empty one, the root) gains the child s + token.
        """
        children, count, total, best = self.children, self.count, self.total, self.best
        grown = []
        for node in [ROOT, *self.active[: self.max_depth - 1]]:  # the hot loop, kept flat
            kids = children[node]
            if kids is None:
                kids = children[node] = {}
            child = kids.get(token)
            if child is None:
                child = kids[token] = self._new_node()
            count[child] += 1
            total[node] += 1
            if token != best[node] and (best[node] < 0 or count[child] >= count[kids[best[node]]]):
                best[node] = token
            grown.append(child)
        self.active = grown
        self.tokens.append(token)
        self.size += 1

    def extend_all(self, tokens) -> None:
        for token in tokens:
            self.extend(int(token))

    def close(self) -> None:
        """End the current document."""
        self.tokens, self.active = [], []

    def _new_node(self) -> int:
        if self.free:
            return self.free.pop()
        self.children.append(None)
        for column in (self.count, self.total, self.best):
            column.append(0)
        self.best[-1] = -1
        return len(self.children) - 1

    # ---- shrinking -----------------------------------------------------------------------------
    def remove_last(self, count: int) -> None:
        """Forget the last `count` tokens of the current document (O((count + D) * D))."""
        count = min(count, len(self.tokens))
        if count <= 0:
            return
        keep = len(self.tokens) - count
        for start in range(max(0, keep - self.max_depth + 1), len(self.tokens)):
            path = self.tokens[start : start + self.max_depth]  # nodes of path[:L] ending >= keep go
            self._unwind(path, first_undone=max(1, keep - start + 1))
        self.tokens = self.tokens[:keep]
        self.size -= count
        self.active = self.suffix_nodes(self.tokens)

    def remove_document(self, tokens: list[int]) -> None:
        """Forget a closed document that was added with `extend` (its exact tokens)."""
        for start in range(len(tokens)):
            self._unwind(tokens[start : start + self.max_depth], first_undone=1)
        self.size -= len(tokens)

    def _unwind(self, path: list[int], first_undone: int) -> None:
        """Undo the counts of path[:L] for L >= first_undone (deepest first)."""
        nodes = [ROOT]
        for token in path:
            nodes.append(self.children[nodes[-1]][token])
        for L in range(len(path), first_undone - 1, -1):
            self._remove_child(nodes[L - 1], path[L - 1])

    def _remove_child(self, node: int, token: int) -> None:
        """Undo one occurrence of s followed by `token` (the inverse of a step of `extend`)."""
        kids = self.children[node]
        child = kids[token]
        self.count[child] -= 1
        self.total[node] -= 1
        if self.count[child] == 0:
            del kids[token]
            self.children[child], self.total[child], self.best[child] = None, 0, -1
            self.free.append(child)
        if token == self.best[node]:
            self.best[node] = max(kids, key=lambda t: self.count[kids[t]], default=-1)
