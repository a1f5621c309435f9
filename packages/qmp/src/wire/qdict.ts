/**
 * Which member QEMU names when several are wrong. QEMU checks a request's members, and its QAPI input
 * visitor looks for unexpected arguments, in the iteration order of its hash tables, not in input order:
 *
 * - a JSON object becomes a QDict: 512 buckets chosen by the tdb string hash, each bucket a list with
 *   the newest key first; iteration walks buckets in order. The request checks (`QMP input member 'X' is
 *   unexpected`, `… must be a string`) follow this order.
 * - the input visitor copies the QDict's keys (in that order) into a GLib hash table (`g_str_hash`,
 *   open addressing with quadratic probing, prime modulus, resized as keys come and go), removes each member
 *   it visits, and names the first key left in table order: `Parameter 'X' is unexpected`.
 *
 * Both orders were checked against qemu-storage-daemon 7.2.22 (GLib 2.74) on 340 random key sets of up to
 * 45 keys, with and without visited members (see test/fixtures/qsd-hostile.ts for recorded cases).
 */

/** The tdb hash QEMU's QDict uses to pick a bucket (32-bit unsigned arithmetic). */
function qdictHash(key: string): number {
  const b = Buffer.from(key, "utf8");
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) value = (value + (((b[i] as number) << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, value) >>> 0) + 12345) >>> 0;
}

const QDICT_BUCKETS = 512;

/**
 * QEMU's iteration order for an object whose keys arrived in `keys` order.
 * @example
 * qdictKeyOrder(["execute", "extra"]) // ["extra", "execute"]: QEMU reports 'extra' first
 */
export function qdictKeyOrder(keys: readonly string[]): string[] {
  return keys
    .map((key, index) => ({ key, index, bucket: qdictHash(key) % QDICT_BUCKETS }))
    .sort((a, b) => a.bucket - b.bucket || b.index - a.index)
    .map((e) => e.key);
}

/** GLib's `g_str_hash` (djb2 over signed chars). */
function strHash(key: string): number {
  const b = Buffer.from(key, "utf8");
  let h = 5381;
  for (const c of b) h = (Math.imul(h, 33) + ((c << 24) >> 24)) >>> 0;
  return h;
}

/** Primes GLib uses as the modulus for a table of 2^shift slots. */
const PRIME_MOD = [
  1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287,
];
const MIN_SHIFT = 3;
const UNUSED = 0;
const TOMBSTONE = 1;

/** A model of a GLib 2.74 string-keyed GHashTable, just enough to know its iteration order. */
class GHashModel {
  #size = 0;
  #mod = 0;
  #mask = 0;
  #hashes: number[] = [];
  #keys: (string | undefined)[] = [];
  #nnodes = 0;
  #noccupied = 0;

  constructor() {
    this.#setShift(MIN_SHIFT);
    this.#hashes = new Array<number>(this.#size).fill(UNUSED);
    this.#keys = new Array<string | undefined>(this.#size).fill(undefined);
  }

  #setShift(shift: number): void {
    this.#size = 1 << shift;
    this.#mod = PRIME_MOD[shift] ?? 2147483647;
    this.#mask = this.#size - 1;
  }

  #index(hash: number): number {
    return (Math.imul(hash, 11) >>> 0) % this.#mod;
  }

  /** The slot holding `key`, or where it would go (first tombstone seen, else the empty slot). */
  #lookup(key: string): { slot: number; found: boolean; hash: number } {
    let hash = strHash(key);
    if (hash <= TOMBSTONE) hash = 2;
    let slot = this.#index(hash);
    let step = 0;
    let tombstone = -1;
    for (let h = this.#hashes[slot] as number; h !== UNUSED; h = this.#hashes[slot] as number) {
      if (h === hash && this.#keys[slot] === key) return { slot, found: true, hash };
      if (h === TOMBSTONE && tombstone < 0) tombstone = slot;
      step++;
      slot = (slot + step) & this.#mask;
    }
    return { slot: tombstone >= 0 ? tombstone : slot, found: false, hash };
  }

  insert(key: string): void {
    const { slot, found, hash } = this.#lookup(key);
    if (found) return;
    const reused = this.#hashes[slot] === TOMBSTONE;
    this.#hashes[slot] = hash;
    this.#keys[slot] = key;
    this.#nnodes++;
    if (!reused) {
      this.#noccupied++;
      this.#maybeResize();
    }
  }

  remove(key: string): void {
    const { slot, found } = this.#lookup(key);
    if (!found) return;
    this.#hashes[slot] = TOMBSTONE;
    this.#keys[slot] = undefined;
    this.#nnodes--;
    this.#maybeResize();
  }

  #maybeResize(): void {
    const size = this.#size;
    if (
      (size > this.#nnodes * 4 && size > 1 << MIN_SHIFT) ||
      size <= this.#noccupied + Math.floor(this.#noccupied / 16)
    )
      this.#resize();
  }

  /** GLib's in-place resize: entries move in slot order, evicting not-yet-moved entries from their targets. */
  #resize(): void {
    const oldSize = this.#size;
    let shift = 0;
    for (let n = Math.floor(this.#nnodes * 1.333); n > 0; n >>= 1) shift++;
    this.#setShift(Math.max(shift, MIN_SHIFT));
    const n = Math.max(oldSize, this.#size);
    while (this.#hashes.length < n) {
      this.#hashes.push(UNUSED);
      this.#keys.push(undefined);
    }
    const moved = new Array<boolean>(n).fill(false);
    for (let i = 0; i < oldSize; i++) {
      let hash = this.#hashes[i] as number;
      if (hash <= TOMBSTONE) {
        this.#hashes[i] = UNUSED;
        continue;
      }
      if (moved[i]) continue;
      this.#hashes[i] = UNUSED;
      let key = this.#keys[i];
      this.#keys[i] = undefined;
      for (;;) {
        let target = this.#index(hash);
        let step = 0;
        while (moved[target]) {
          step++;
          target = (target + step) & this.#mask;
        }
        moved[target] = true;
        const replacedHash = this.#hashes[target] as number;
        const replacedKey = this.#keys[target];
        this.#hashes[target] = hash;
        this.#keys[target] = key;
        if (replacedHash <= TOMBSTONE) break;
        hash = replacedHash;
        key = replacedKey;
      }
    }
    this.#hashes.length = this.#size;
    this.#keys.length = this.#size;
    this.#noccupied = this.#nnodes;
  }

  first(): string | undefined {
    for (let i = 0; i < this.#size; i++) if ((this.#hashes[i] as number) > TOMBSTONE) return this.#keys[i];
    return undefined;
  }
}

/**
 * The member QEMU's QAPI input visitor reports as `Parameter 'X' is unexpected`: `keys` are the object's
 * members in input order, `visited` the members the visitor consumed, in visit order (the schema's member
 * order, only those present). Returns undefined when every key was visited.
 * @example
 * firstUnexpectedMember(["zzz", "x"], []) // "zzz"
 */
export function firstUnexpectedMember(
  keys: readonly string[],
  visited: readonly string[] = [],
): string | undefined {
  if (keys.length === 0) return undefined;
  if (keys.length === 1) return visited.includes(keys[0] as string) ? undefined : keys[0];
  const table = new GHashModel();
  for (const key of qdictKeyOrder(keys)) table.insert(key);
  for (const key of visited) table.remove(key);
  return table.first();
}
