"""A depth-bounded suffix tree with occurrence counts, grown one token at a time.

SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
Applications", arXiv 2411.04975) indexes every suffix of a text, up to `max_depth` tokens deep,
in a trie whose nodes count how often their path occurs. The path of a node is a substring s;
its children are the tokens that followed s, and `child.count / node.total` is the empirical
probability of that next token.

Appending a token costs O(max_depth): the tree keeps the nodes of the text's current suffixes
(`active`, shortest first) and extends each by the new token. Nothing is rebuilt per round.
"""

from __future__ import annotations


class Node:
    """One substring s: how often it occurs, and what followed it."""

    __slots__ = ("children", "count", "total", "best")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}  # next token -> node of s + token
        self.count = 0  # occurrences of s
        self.total = 0  # occurrences of s followed by some token (sum of children's counts)
        self.best = -1  # the most frequent next token (ties: the one seen most recently)

    def remove_child(self, token: int) -> None:
        """Undo one occurrence of s followed by `token` (the inverse of a step of `extend`)."""
        child = self.children[token]
        child.count -= 1
        self.total -= 1
        if child.count == 0:
            del self.children[token]
        if token == self.best:
            self.best = max(self.children, key=lambda t: self.children[t].count, default=-1)


class SuffixTree:
    """All substrings of up to `max_depth` tokens of one or more documents, with their counts.

    `extend(token)` appends to the current document; `close()` ends it, so that suffixes of the
    next document do not run across the border. `remove_last(n)` undoes the last n appends.
    """

    def __init__(self, max_depth: int = 64):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.root = Node()
        self.tokens: list[int] = []  # the current document
        self.active: list[Node] = []  # active[m - 1] = node of tokens[-m:], for m = 1..max_depth
        self.size = 0  # tokens indexed, over all documents

    def extend(self, token: int) -> None:
        """Append one token to the current document: O(max_depth).

        Each suffix s of the text so far (and the empty one, the root) gains the child s + token.
        """
        grown = []
        for node in [self.root, *self.active[: self.max_depth - 1]]:  # inlined: this is the hot loop
            children = node.children
            child = children.get(token)
            if child is None:
                child = children[token] = Node()
            child.count += 1
            node.total += 1
            if token != node.best and (node.best < 0 or child.count >= children[node.best].count):
                node.best = token
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

    def remove_last(self, count: int) -> None:
        """Forget the last `count` tokens of the current document (O((count + D) * D))."""
        count = min(count, len(self.tokens))
        if count <= 0:
            return
        keep = len(self.tokens) - count
        D = self.max_depth
        for start in range(max(0, keep - D + 1), len(self.tokens)):
            path = self.tokens[start : start + D]  # nodes of path[:L] with end >= keep are undone
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
        nodes = [self.root]
        for token in path:
            nodes.append(nodes[-1].children[token])
        for L in range(len(path), first_undone - 1, -1):
            nodes[L - 1].remove_child(path[L - 1])

    def suffix_nodes(self, tokens: list[int]) -> list[Node]:
        """Nodes of tokens[-m:] for m = 1.. while they exist (at most max_depth)."""
        found: list[Node] = []
        for m in range(1, min(self.max_depth, len(tokens)) + 1):
            node = self.find(tokens[-m:])
            if node is None:
                break
            found.append(node)
        return found

    def find(self, path) -> Node | None:
        node = self.root
        for token in path:
            node = node.children.get(token)
            if node is None:
                return None
        return node

    def follow(self, matches: list[Node], token: int) -> list[Node]:
        """Given the nodes of a context's suffixes (shortest first), those after appending `token`.

        Used to track a context in a tree that does not index it (the corpus of earlier outputs).
        The set of suffixes present is closed under shortening, so the first miss ends the list.
        """
        grown: list[Node] = []
        for node in [self.root, *matches[: self.max_depth - 1]]:
            child = node.children.get(token)
            if child is None:
                break
            grown.append(child)
        return grown
