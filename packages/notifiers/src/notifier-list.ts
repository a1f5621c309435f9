/**
 * A notifier: called with the list's argument; may be async. A returned promise is awaited before the next
 * notifier runs; a throw or a rejection stops the pass and fails {@link NotifierList.notify}.
 */
export type Notifier<T> = (arg: T) => void | Promise<void>;

interface Entry<T> {
  readonly fn: Notifier<T>;
  removed: boolean;
}

/**
 * An ordered list of async notifiers, the model of QEMU's before-write notifier list: a notify pass calls
 * every notifier in registration order, one at a time, awaiting each.
 *
 * Changes during a pass are well-defined:
 * - a pass works on a **snapshot** of the list taken when `notify` is called: a notifier added during the
 *   pass is not called by it (the next pass sees it);
 * - a notifier removed during the pass and not called yet is **skipped**; one already called is not
 *   affected;
 * - several passes may run at once (one per concurrent request); each has its own snapshot.
 *
 * The same function may be added twice; it is then called twice per pass, and each `add` returns a
 * remover for its own registration.
 * @example
 * const list = new NotifierList<{ offset: number; bytes: number }>();
 * const off = list.add(async (req) => { await copyOldDataOut(req); });
 * await list.notify({ offset: 0, bytes: 4096 });
 * off();
 */
export class NotifierList<T> {
  #entries: Entry<T>[] = [];

  /**
   * Registers `fn` at the end of the list.
   * @returns a remover: removes this registration (idempotent; `true` the first time it removed it).
   */
  add(fn: Notifier<T>): () => boolean {
    const entry: Entry<T> = { fn, removed: false };
    // Copy on write: passes in progress keep iterating over their own snapshot array.
    this.#entries = [...this.#entries, entry];
    return () => this.#removeEntry(entry);
  }

  /**
   * Removes the earliest registration of `fn`.
   * @returns `true` if `fn` was registered, `false` otherwise.
   */
  remove(fn: Notifier<T>): boolean {
    const entry = this.#entries.find((e) => e.fn === fn);
    return entry === undefined ? false : this.#removeEntry(entry);
  }

  /** Removes every notifier (passes in progress skip the ones they have not called yet). */
  clear(): void {
    for (const e of this.#entries) e.removed = true;
    this.#entries = [];
  }

  /** The number of registered notifiers. */
  get size(): number {
    return this.#entries.length;
  }

  /**
   * Calls every notifier registered now, in registration order, awaiting each one before the next.
   * Resolves when all have finished; the first throw or rejection rejects it with that error, and the
   * notifiers after the failing one are not called.
   */
  async notify(arg: T): Promise<void> {
    const snapshot = this.#entries;
    for (const entry of snapshot) {
      if (entry.removed) continue;
      await entry.fn(arg);
    }
  }

  #removeEntry(entry: Entry<T>): boolean {
    if (entry.removed) return false;
    entry.removed = true;
    this.#entries = this.#entries.filter((e) => e !== entry);
    return true;
  }
}
