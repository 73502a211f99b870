"""The Lua scripts of the Redis Store (``store_redis.py``), one per operation.

Each script is atomic on the Redis instance: a batch of accepts, acks or
deliveries is applied whole or not at all, and a retry after a lost reply
meets either nothing or the whole batch (dedup then answers the original
msg_id).  The key layout is in ``store_redis.py``'s docstring.

Conventions, which every script follows:

* ``ARGV[1]`` is the key prefix and ``ARGV[2]`` a candidate epoch; the
  common header (:data:`_HEADER`) reads ``<p>:epoch`` and, when it is gone
  (a flushed or lost instance), sets the candidate, so the first script to
  run after the loss chooses the new epoch and every worker converges on
  it.  Every script returns ``{epoch, answer}``; the caller compares the
  epoch with the one it holds.  No extra round trip per call.
* Times, refs and other values that must come back bit-exact travel as the
  strings Python made (``repr(float)``, ``str(int)``) and are stored as
  they came: Lua's ``tostring`` keeps only 14 digits, and a ref uses all 64
  bits, more than a Lua number holds.  Comparisons use ``tonumber`` (IEEE
  doubles, as Python compares).
* Keys are built here from the prefix and the tenant (``{<tenant>}`` is the
  hash tag), which Redis standalone allows; ``store_redis.py`` says how
  each script would be split by slot under Redis Cluster.

What the hot path costs (accept, delivered, ack of one payment result):
one value string per message (written with one MSET per batch), and per
inbox and batch one HINCRBY of the terminal's positions hash and one RPUSH
of its entries list; a batch's deliveries and acks of an inbox are one
HMGET and one HSET of its positions and one RPUSH of its range log.
Delivered and acked are positions, not per-entry state: the times the
trace shows come from the range log.  Redis spends most of a script's time
in Lua's own work (strings, tables), so what repeats is made once per run
(``box``, ``base``).
"""

from __future__ import annotations

_HEADER = """
local P = ARGV[1]
local epoch = redis.call("GET", P .. ":epoch")
if not epoch then
  redis.call("SET", P .. ":epoch", ARGV[2])
  epoch = ARGV[2]
end
-- Terminals (or ended entries) of a tenant one expire or trim takes at
-- most: a script blocks Redis while it runs.
local SWEEP = 2000
-- A lane's field names in a terminal's positions hash (last, acked,
-- delivered, highest seq whose message asked for receipts, trimmed, how
-- many entries above acked ended), its entries list, its range log records.
local LANE = {}
for _, lane in ipairs({"0", "1"}) do
  LANE[lane] = {l = "l" .. lane, a = "a" .. lane, d = "d" .. lane, r = "r" .. lane,
                z = "z" .. lane, x = "x" .. lane, dl = lane .. "d", al = lane .. "a", name = lane}
end
LANE[0], LANE[1] = LANE["0"], LANE["1"]
local function tenant_of(address)
  local _, _, t = string.find(address, "^[^:]*:([^/]*)")
  return t or ""
end
local bases = {}
local function base(tenant)
  local b = bases[tenant]
  if not b then
    b = P .. ":{" .. tenant .. "}:s"
    bases[tenant] = b
  end
  return b
end
local boxes = {}
-- A terminal's keys, each made when first asked for: its positions hash
-- (p, both lanes), its entry lists (one per lane, "0" and "1") and its
-- range log (g).
local KEY_PARTS = {p = ":p:", g = ":g:", ["0"] = ":e0:", ["1"] = ":e1:"}
local BOX = {__index = function(k, name)
  local v = k.B .. KEY_PARTS[name] .. k.t
  k[name] = v
  return v
end}
local function box(t)
  local k = boxes[t]
  if not k then
    local tenant = tenant_of(t)
    k = setmetatable({B = base(tenant), tenant = tenant, t = t}, BOX)
    boxes[t] = k
  end
  return k
end
-- An entry: msg_id, recipient index, the message's tenant and flags: "r"
-- the message asked for receipts, "1" it has one recipient, "x" the entry
-- ended (expired or rejected).
local function entry_of(member)
  local _, _, id, i, tenant, flags = string.find(member, "^(%d+):(%d+):([^:]*):?(.*)$")
  return id, i, tenant, flags
end
local function has(flags, c)
  return string.find(flags, c, 1, true) ~= nil
end
-- A message's value, as the node made it: its header (the JSON array
-- [tenant, sender, ref, lane, kind, to, created, receipt, [recipients],
-- expires]), a newline, its body.  Its recipients' seqs are in its x hash
-- ("q": all of a group's; "q<i>": recipient i's when it ended or was
-- redriven), or else (one recipient) found in its entries list.
local function parts(v)
  local nl = string.find(v, "\\n", 1, true)
  return string.sub(v, 1, nl - 1), string.sub(v, nl + 1)
end
local function head(v)
  return cjson.decode((parts(v)))
end
-- (The header's last value, before the first newline: JSON has none.)
local function expires_of(v)
  return string.match(v, ',"([^"]*)"%]\\n')
end
local function split(s)
  local out = {}
  for x in string.gmatch(s, "[^,]+") do out[#out + 1] = x end
  return out
end
local function hash(flat)
  local out = {}
  for k = 1, #flat, 2 do out[flat[k]] = flat[k + 1] end
  return out
end
-- The seq of recipient r (terminal t) of message id in lane ("0"/"1"); x
-- is the message's x hash as a table.
local function seq_of(id, r, t, lane, x)
  local q = x["q" .. r]
  if q then return tonumber(q) end
  if x.q then return tonumber(split(x.q)[r]) end
  local k = box(t)
  local z = tonumber(redis.call("HGET", k.p, LANE[lane].z)) or 0
  local prefix = id .. ":" .. r .. ":"
  for i, member in ipairs(redis.call("LRANGE", k[lane], 0, -1)) do
    if string.sub(member, 1, #prefix) == prefix then return z + i end
  end
  return nil
end
-- One command for a list of arguments (in slices: unpack has a bound).
local function bulk(cmd, key, list, opt)
  for k = 1, #list, 4000 do
    if opt then
      redis.call(cmd, key, opt, unpack(list, k, math.min(k + 3999, #list)))
    elseif key then
      redis.call(cmd, key, unpack(list, k, math.min(k + 3999, #list)))
    else
      redis.call(cmd, unpack(list, k, math.min(k + 3999, #list)))
    end
  end
end
-- A lane's entries, seqs first..last (above its trimmed position z: entry
-- seq is at index seq - z - 1 of the list), in slices: calls fn(seq, member)
-- for each, until fn returns true.
local function each_entry(list, z, first, last, fn)
  local s = first
  while s <= last do
    local e = math.min(last, s + 999)
    local got = redis.call("LRANGE", list, s - z - 1, e - z - 1)
    for k = 1, #got do
      if fn(s + k - 1, got[k]) then return end
    end
    s = e + 1
  end
end
-- Receipts of the pending entries in first..last that asked for one.
local function receipts(out, t, L, first, last)
  local k = box(t)
  local z = tonumber(redis.call("HGET", k.p, L.z)) or 0
  each_entry(k[L.name], z, first, last, function(_, member)
    local id, _, tenant, flags = entry_of(member)
    if has(flags, "r") and not has(flags, "x") then
      local h = head(redis.call("GET", base(tenant) .. ":m:" .. id))
      out[#out + 1] = {tonumber(id), t, h[2], h[3]}
    end
  end)
end
local function dead_letter(B, v, id, terminal, lane, seq, reason, at)
  local h = head(v)             -- (kind, sender, ref, receipt: 5, 2, 3, 8)
  local n = redis.call("INCR", P .. ":dlseq")
  local enc = cjson.encode({id, terminal, tostring(lane), tostring(seq), h[5], reason, at,
                            h[2], h[3], h[8]})
  redis.call("ZADD", B .. ":dead", n, n .. "\\n" .. enc)
  redis.call("HINCRBY", B .. ":n", "dead", 1)
  return enc
end
-- A pending entry ends (expired or rejected): flagged in the inbox and
-- counted among the lane's ended entries above acked (an ack passing them
-- then counts them out), its state in the message's ``x`` hash, the
-- message a trim candidate from ``at`` on.  Returns the dead letter.
local function end_entry(t, lane, seq, member, state, at, reason)
  local k, L = box(t), LANE[lane]
  local id, idx, tenant = entry_of(member)
  local MB = base(tenant)
  local z = tonumber(redis.call("HGET", k.p, L.z)) or 0
  redis.call("LSET", k[lane], seq - z - 1, member .. "x")
  redis.call("HINCRBY", k.p, L.x, 1)
  redis.call("HSET", MB .. ":x:" .. id, "s" .. idx, state, "e" .. idx, at, "w" .. idx, reason,
             "q" .. idx, seq)
  redis.call("ZADD", MB .. ":ended", at, id .. " " .. idx)
  local B = k.B
  redis.call("HINCRBY", B .. ":n", "unacked", -1)
  return dead_letter(B, redis.call("GET", MB .. ":m:" .. id), id, t, lane, seq, reason, at)
end
"""

# ARGV[3] dedup window; ARGV[4] the items, a flat JSON array of 8 values per
# message: tenant, dedup key ("<sender>\\n<ref>", "" without a ref),
# created, expires, lane, flags (1: it asks for receipts, 2: its
# recipients are all of its tenant), [recipients...], the length of its
# payload; ARGV[5] the payloads (header, newline, body), one after the
# other.  Answer, flat: per item its msg_id, 1 if a duplicate (and nothing
# more) else 0 and then the seq of each recipient.
#
# Dedup entries live in hashes per window-long bucket of ``created``
# (``dd:<bucket>``, "<msg_id> <created>"): a lookup reads the bucket of
# the message and its two neighbours, a trim drops whole buckets; the
# newest msg_id found wins, then the exact window test.
#
# Lua makes a new string at each concatenation and a table at each {}: the
# loops below make as few as they can per message (one key, one value, one
# entry; a dedup entry), which is most of what an accept costs.
ACCEPT = _HEADER + """
local window = tonumber(ARGV[3])
local width = window
if width < 1 then width = 1 end
local raw, blob = cjson.decode(ARGV[4]), ARGV[5]
local per_base, bucket = {}, {}
local function of_base(B)
  local pb = per_base[B]
  if not pb then
    pb = {keys = {}, asked = {}, buckets = {}, seen = {}, in_batch = {}, dd = {},
          messages = 0, unacked = 0, bytes = 0}
    per_base[B] = pb
  end
  return pb
end
local last_pb, last_b
for j = 1, #raw, 8 do
  local dkey = raw[j + 1]
  if dkey ~= "" then
    local pb = of_base(base(raw[j]))
    local b = math.floor(tonumber(raw[j + 2]) / width)
    bucket[j] = b
    if pb ~= last_pb or b ~= last_b then
      pb.buckets[b - 1], pb.buckets[b], pb.buckets[b + 1] = true, true, true
      last_pb, last_b = pb, b
    end
    if not pb.asked[dkey] then
      pb.asked[dkey] = true
      pb.keys[#pb.keys + 1] = dkey
    end
  end
end
for B, pb in pairs(per_base) do
  local keys = pb.keys
  for b in pairs(pb.buckets) do
    for k = 1, #keys, 1000 do
      local found = redis.call("HMGET", B .. ":dd:" .. b, unpack(keys, k, math.min(k + 999, #keys)))
      for j = 1, #found do
        if found[j] then
          local _, _, id, created = string.find(found[j], "^(%d+) (.*)$")
          local key = keys[k + j - 1]
          local prior = pb.seen[key]
          if not prior or tonumber(id) > tonumber(prior[1]) then pb.seen[key] = {id, created} end
        end
      end
    end
  end
end
-- orig[j]: the msg_id of the message item j duplicates (a string), or the
-- index of the earlier item of this batch it duplicates (in_batch: the
-- item that holds a key in this batch).
local orig, fresh = {}, 0
for j = 1, #raw, 8 do
  local dkey = raw[j + 1]
  if dkey ~= "" then
    local pb = per_base[base(raw[j])]
    local created = tonumber(raw[j + 2])
    local prior = pb.in_batch[dkey]
    if prior then
      if created - tonumber(raw[prior + 2]) <= window then orig[j] = prior end
    else
      local seen = pb.seen[dkey]
      if seen and created - tonumber(seen[2]) <= window then orig[j] = seen[1] end
    end
    if not orig[j] then pb.in_batch[dkey] = j end
  end
  if not orig[j] then fresh = fresh + 1 end
end
local id = 0
if fresh > 0 then id = redis.call("INCRBY", P .. ":msgid", fresh) - fresh end
-- Each inbox's new entries are counted first, so its last seq moves with
-- one HINCRBY for the batch and its entries go in with one RPUSH.  at[j]:
-- item j's inbox (one recipient) or list of inboxes.
local lanes, order, at = {["0"] = {}, ["1"] = {}}, {}, {}
for j = 1, #raw, 8 do
  if not orig[j] then
    local lane, rcpts = raw[j + 4], raw[j + 6]
    local byt = lanes[lane]
    local B = raw[j + 5] >= 2 and base(raw[j]) or nil
    local list = #rcpts ~= 1 and {} or nil
    for r = 1, #rcpts do
      local t = rcpts[r]
      local inbox = byt[t]
      if not inbox then
        local TB, tenant = B, raw[j]
        if not TB then
          tenant = tenant_of(t)
          TB = base(tenant)
        end
        inbox = {p = TB .. ":p:" .. t, e = TB .. ":e" .. lane .. ":" .. t, TB = TB, t = t,
                 tenant = tenant, L = LANE[lane], count = 0, entries = {}, n = 0, ex = math.huge}
        byt[t] = inbox
        order[#order + 1] = inbox
      end
      inbox.count = inbox.count + 1
      if list then list[r] = inbox else at[j] = inbox end
    end
    if list then at[j] = list end
  end
end
for k = 1, #order do
  local inbox = order[k]
  inbox.seq = redis.call("HINCRBY", inbox.p, inbox.L.l, inbox.count) - inbox.count
end
-- An entry's end by tenant, then by receipts (1) and one recipient (2).
local tails = {}
local function tails_of(tenant)
  local v = tails[tenant]
  if not v then
    local t = ":" .. tenant .. ":"
    v = {[0] = t, [1] = t .. "r", [2] = t .. "1", [3] = t .. "r1"}
    tails[tenant] = v
  end
  return v
end
-- (Counters, not #: Lua finds a table's length by a search each time.)
local tenants, out, values, ids, pos, no, nv = {}, {}, {}, {}, 1, 0, 0
local last_tenant, B, pb, tl
for j = 1, #raw, 8 do
  local size = raw[j + 7]
  local o = orig[j]
  if o then
    if type(o) == "string" then out[no + 1] = tonumber(o) else out[no + 1] = ids[o] end
    out[no + 2] = 1
    no = no + 2
  else
    id = id + 1
    ids[j] = id
    local sid = tostring(id)           -- (formatted once, not at each use)
    local tenant, expires = raw[j], raw[j + 3]
    local code = raw[j + 5] % 2
    local receipt = code == 1
    if tenant ~= last_tenant then
      last_tenant, B = tenant, base(tenant)
      pb, tl = of_base(B), tails_of(tenant)
    end
    out[no + 1] = id
    out[no + 2] = 0
    no = no + 2
    local ex = tonumber(expires)
    local inbox, v = at[j], nil
    if inbox and inbox.t then           -- (one recipient)
      local seq = inbox.seq + 1
      inbox.seq = seq
      local n = inbox.n + 1
      inbox.n = n
      inbox.entries[n] = sid .. ":1" .. tl[code + 2]
      if receipt then inbox.receipt = seq end
      if ex < inbox.ex then inbox.exp, inbox.ex = expires, ex end
      no = no + 1
      out[no] = seq
      v = string.sub(blob, pos, pos + size - 1)
      pb.unacked = pb.unacked + 1
    else
      local list, seqs = inbox or {}, {}
      local t0 = tl[code]
      for r = 1, #list do
        inbox = list[r]
        local seq = inbox.seq + 1
        inbox.seq = seq
        local n = inbox.n + 1
        inbox.n = n
        inbox.entries[n] = sid .. ":" .. r .. t0
        if receipt then inbox.receipt = seq end
        if ex < inbox.ex then inbox.exp, inbox.ex = expires, ex end
        seqs[r] = seq
        no = no + 1
        out[no] = seq
      end
      v = string.sub(blob, pos, pos + size - 1)
      if #list == 0 then
        redis.call("ZADD", B .. ":done", 0, sid)
      else
        redis.call("HSET", B .. ":x:" .. sid, "q", table.concat(seqs, ","))
      end
      pb.unacked = pb.unacked + #list
    end
    values[nv + 1] = B .. ":m:" .. sid
    values[nv + 2] = v
    nv = nv + 2
    pb.messages, pb.bytes = pb.messages + 1, pb.bytes + #v
    tenants[tenant] = true
    local b = bucket[j]
    if b then
      local dd = pb.dd[b]
      if not dd then
        dd = {n = 0}
        pb.dd[b] = dd
      end
      local n = dd.n
      dd[n + 1] = raw[j + 1]
      dd[n + 2] = sid .. " " .. raw[j + 2]
      dd.n = n + 2
    end
  end
  pos = pos + size
end
bulk("MSET", nil, values)
local exps = {}
for k = 1, #order do
  local inbox = order[k]
  bulk("RPUSH", inbox.e, inbox.entries)
  if inbox.receipt then redis.call("HSET", inbox.p, inbox.L.r, inbox.receipt) end
  local e = exps[inbox.TB]
  if not e then
    e = {}
    exps[inbox.TB] = e
    tenants[inbox.tenant] = true
  end
  e[#e + 1] = inbox.exp
  e[#e + 1] = inbox.t
end
for TB, e in pairs(exps) do bulk("ZADD", TB .. ":exp", e, "LT") end
for B, pb in pairs(per_base) do
  for b, dd in pairs(pb.dd) do
    bulk("HSET", B .. ":dd:" .. b, dd)
    redis.call("ZADD", B .. ":ddb", b, b)
  end
  if pb.messages > 0 then
    redis.call("HINCRBY", B .. ":n", "messages", pb.messages)
    redis.call("HINCRBY", B .. ":n", "unacked", pb.unacked)
    redis.call("HINCRBY", B .. ":n", "bytes", pb.bytes)
  end
end
for tenant in pairs(tenants) do redis.call("SADD", P .. ":tenants", tenant) end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] after, ARGV[6] limit.
# Answer: per pending entry {seq, msg_id, value, delivered}.
INBOX = _HEADER + """
local t, L = ARGV[3], LANE[ARGV[4]]
local limit = tonumber(ARGV[6])
local k = box(t)
local f = redis.call("HMGET", k.p, L.a, L.l, L.d, L.z)
local acked, last, dpos = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
local out = {}
if limit > 0 then
  each_entry(k[L.name], tonumber(f[4]) or 0, math.max(tonumber(ARGV[5]), acked) + 1, last,
             function(seq, member)
    local id, _, tenant, flags = entry_of(member)
    if not has(flags, "x") then
      out[#out + 1] = {seq, tonumber(id), redis.call("GET", base(tenant) .. ":m:" .. id),
                       seq <= dpos and 1 or 0}
    end
    return #out >= limit
  end)
end
return {epoch, out}
"""

# ARGV[3...] terminals.  Answer: each one's {acked P0, last P0, acked P1,
# last P1}.
POSITIONS_MANY = _HEADER + """
local out = {}
for a = 3, #ARGV do
  local f = redis.call("HMGET", box(ARGV[a]).p, "a0", "l0", "a1", "l1")
  out[#out + 1] = {tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0,
                   tonumber(f[4]) or 0}
end
return {epoch, out}
"""

# ARGV[3] now, ARGV[4] the deliveries, a flat JSON array of (terminal, lane,
# first, last) quadruples, ARGV[5] the acks, one of (terminal, lane, seq)
# triples (JSON: one argument each, not one per value, which the node
# packs in Python at some cost).  Answer: {receipts of first deliveries, receipts of newly acked
# messages}, each {msg_id, terminal, sender, ref}.
#
# Delivered and acked are positions.  The node delivers an inbox in seq
# order, so a range past the delivered position moves it and logs the new
# part ("<lane>d<first> <last> <at>"), and one within it (a redelivery)
# changes nothing; an ack moves the acked position and logs its range
# ("<lane>a<first> <last> <at>").  Each inbox's positions are read once
# and written once for its deliveries and acks, which apply in the order
# given (the node sends a batch's deliveries and acks together: see
# store_redis.py's _next_write).  The
# terminal's oldest ack not yet trimmed ("w") puts it on its tenant's trim
# list.  The unacked count drops by each acked range less the ended
# entries in it.
PROGRESS = _HEADER + """
local now = ARGV[3]
local deliveries, acks = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
-- Each inbox's positions, read when first named, changed in the order the
-- deliveries and acks come (as one call after the other would), written
-- once at the end.
local lanes, order = {{}, {}}, {}
local function inbox(t, lane)
  local byt = lanes[lane + 1]
  local g = byt[t]
  if not g then
    local k, L = box(t), LANE[lane]
    local f = redis.call("HMGET", k.p, L.a, L.l, L.d, L.r, L.x, "w")
    g = {t = t, k = k, L = L, acked = tonumber(f[1]) or 0, last = tonumber(f[2]),
         dpos = tonumber(f[3]) or 0, rpos = tonumber(f[4]) or 0, ended = tonumber(f[5]) or 0,
         w = f[6], recs = {}}
    byt[t] = g
    order[#order + 1] = g
  end
  return g
end
local delivered, acked_out, unacked, work = {}, {}, {}, {}
for a = 1, #deliveries, 4 do
  local t = deliveries[a]
  local g = inbox(t, deliveries[a + 1])
  if g.last then
    local dlast = math.min(deliveries[a + 3], g.last)
    if dlast > g.dpos then
      local new = math.max(deliveries[a + 2], g.acked + 1, g.dpos + 1, 1)
      if new <= dlast then
        if g.rpos >= new then receipts(delivered, t, g.L, new, dlast) end
        g.dpos, g.moved = dlast, true
        g.recs[#g.recs + 1] = g.L.dl .. new .. " " .. dlast .. " " .. now
      end
    end
  end
end
for a = 1, #acks, 3 do
  local t = acks[a]
  local g = inbox(t, acks[a + 1])
  local seq = acks[a + 2]
  if g.last and seq > g.last then seq = g.last end
  if g.last and seq > g.acked then
    local L, acked = g.L, g.acked
    local n = seq - acked
    if g.ended > 0 then        -- (the ended entries it passes were not unacked)
      local z, passed = tonumber(redis.call("HGET", g.k.p, L.z)) or 0, 0
      each_entry(g.k[L.name], z, acked + 1, seq, function(_, member)
        if string.sub(member, -1) == "x" then passed = passed + 1 end
      end)
      n, g.ended, g.ended_moved = n - passed, g.ended - passed, true
    end
    local B = g.k.B
    if not g.w then
      g.w = now
      g.w_moved = true
      local w = work[B]
      if not w then
        w = {}
        work[B] = w
      end
      w[#w + 1] = now
      w[#w + 1] = t
    end
    if g.rpos > acked then receipts(acked_out, t, L, acked + 1, seq) end
    g.recs[#g.recs + 1] = L.al .. (acked + 1) .. " " .. seq .. " " .. now
    g.acked, g.acked_moved = seq, true
    unacked[B] = (unacked[B] or 0) + n
  end
end
for _, g in ipairs(order) do
  if #g.recs > 0 then
    local L, fields = g.L, {}
    if g.moved then
      fields[#fields + 1] = L.d
      fields[#fields + 1] = g.dpos
    end
    if g.acked_moved then
      fields[#fields + 1] = L.a
      fields[#fields + 1] = g.acked
    end
    if g.ended_moved then
      fields[#fields + 1] = L.x
      fields[#fields + 1] = g.ended
    end
    if g.w_moved then
      fields[#fields + 1] = "w"
      fields[#fields + 1] = g.w
    end
    redis.call("HSET", g.k.p, unpack(fields))
    redis.call("RPUSH", g.k.g, unpack(g.recs))
  end
end
for B, n in pairs(unacked) do
  if n ~= 0 then redis.call("HINCRBY", B .. ":n", "unacked", 0 - n) end
end
for B, w in pairs(work) do bulk("ZADD", B .. ":acked", w, "NX") end
return {epoch, {delivered, acked_out}}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] seq, ARGV[6] reason, ARGV[7] now.
# Answer: the dead letter (JSON) or false.
REJECT = _HEADER + """
local t, lane, seq = ARGV[3], ARGV[4], tonumber(ARGV[5])
local k, L = box(t), LANE[ARGV[4]]
local f = redis.call("HMGET", k.p, L.a, L.l, L.z)
if seq <= (tonumber(f[1]) or 0) or seq > (tonumber(f[2]) or 0) then return {epoch, false} end
local member = redis.call("LINDEX", k[lane], seq - (tonumber(f[3]) or 0) - 1)
if not member then return {epoch, false} end
local _, _, _, flags = entry_of(member)
if has(flags, "x") then return {epoch, false} end
return {epoch, end_entry(t, lane, seq, member, "rejected", ARGV[7], ARGV[6])}
"""

# ARGV[3] now.  Dead-letters every pending entry whose message expired by
# now, in (msg_id, recipient) order.  Each tenant's ``exp`` holds, per
# terminal, a lower bound of its pending entries' expiry: only terminals
# past theirs are read, and get their bound set exactly (or leave the set).
# A call takes at most SWEEP terminals of each tenant (the next call the
# rest: the node's maintenance calls every few seconds).  Answer: the dead
# letters (JSON).
EXPIRE = _HEADER + """
local now = ARGV[3]
local limit = tonumber(now)
local due = {}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local TB = base(tenant)
  for _, t in ipairs(redis.call("ZRANGEBYSCORE", TB .. ":exp", "-inf", now, "LIMIT", 0, SWEEP)) do
    local k = box(t)
    local f = redis.call("HMGET", k.p, "a0", "l0", "z0", "a1", "l1", "z1")
    local low
    for lane = 0, 1 do
      local o = lane * 3
      each_entry(k[LANE[lane].name], tonumber(f[o + 3]) or 0, (tonumber(f[o + 1]) or 0) + 1,
                 tonumber(f[o + 2]) or 0, function(seq, member)
        local id, idx, mt, flags = entry_of(member)
        if not has(flags, "x") then
          local v = redis.call("GET", base(mt) .. ":m:" .. id)
          local ex = tonumber(expires_of(v))
          if ex <= limit then
            due[#due + 1] = {tonumber(id), tonumber(idx), t, tostring(lane), seq, member}
          elseif not low or ex < low then
            low = ex
          end
        end
      end)
    end
    if low then
      redis.call("ZADD", TB .. ":exp", low, t)
    else
      redis.call("ZREM", TB .. ":exp", t)
    end
  end
end
table.sort(due, function(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end)
local out = {}
for _, d in ipairs(due) do
  out[#out + 1] = end_entry(d[3], d[4], d[5], d[6], "expired", now, "ttl")
end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] msg_id ("" = every one of the terminal's),
# ARGV[5] / ARGV[6] the expiry a redriven P0 / P1 entry gets at least,
# ARGV[7] limit.  The terminal's tenant's dead letters are read oldest
# first (one pass over them: an operator's call, not a hot path); each of
# the terminal's whose message is still held becomes recipient n+1 of its
# message (reason "redriven"), the next seq of its inbox, and leaves the
# dead letters.  Answer: per entry {msg_id, lane, dead seq, seq, kind, body,
# created, expires}.
REDRIVE = _HEADER + """
local t, want, limit = ARGV[3], ARGV[4], tonumber(ARGV[7])
local k = box(t)
local B = k.B
local out = {}
if limit <= 0 then return {epoch, out} end
for _, member in ipairs(redis.call("ZRANGE", B .. ":dead", 0, -1)) do
  local d = cjson.decode(string.sub(member, string.find(member, "\\n", 1, true) + 1))
  if d[2] == t and (want == "" or d[1] == want) then
    local id, lane = d[1], d[3]
    -- The message lives under its own tenant (the recipient's, as the node
    -- routes within one tenant; else found as TRACE finds it).
    local MB = B
    local v = redis.call("GET", MB .. ":m:" .. id)
    if not v then
      for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
        v = redis.call("GET", base(tenant) .. ":m:" .. id)
        if v then
          MB = base(tenant)
          break
        end
      end
    end
    if v then
      local L = LANE[lane]
      local header, body = parts(v)
      local h = cjson.decode(header)   -- (tenant, kind, created, receipt: 1, 5, 7, 8)
      local n = #h[9] + 1
      h[9][n] = t
      local seq = redis.call("HINCRBY", k.p, L.l, 1)
      local expires, fresh = h[10], ARGV[5 + tonumber(lane)]
      if tonumber(fresh) > tonumber(expires) then
        expires = fresh
        h[10] = fresh
      end
      local nv = cjson.encode(h) .. "\\n" .. body
      redis.call("SET", MB .. ":m:" .. id, nv)
      redis.call("HINCRBY", MB .. ":n", "bytes", #nv - #v)
      -- (flags: never "1", its message had a recipient before)
      local entry = id .. ":" .. n .. ":" .. h[1] .. (h[8] == "1" and ":r" or ":")
      redis.call("RPUSH", k[lane], entry)
      if h[8] == "1" then redis.call("HSET", k.p, L.r, seq) end
      redis.call("HSET", MB .. ":x:" .. id, "w" .. n, "redriven", "q" .. n, seq)
      redis.call("HINCRBY", B .. ":n", "unacked", 1)
      redis.call("ZADD", B .. ":exp", "LT", expires, t)
      redis.call("ZREM", B .. ":dead", member)
      redis.call("HINCRBY", B .. ":n", "dead", -1)
      out[#out + 1] = {tonumber(id), tonumber(lane), tonumber(d[4]), seq, h[5], body, h[7],
                       expires}
      if #out >= limit then break end
    end
  end
end
return {epoch, out}
"""

# ARGV[3] msg_id.  Answer: {value, the message's x hash (flat), per
# recipient {acked, delivered, its lane's range log, its seq}}, or false.
TRACE = _HEADER + """
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local MB = base(tenant)
  local v = redis.call("GET", MB .. ":m:" .. ARGV[3])
  if v then
    local h = head(v)
    local L = LANE[h[4]]
    local flat = redis.call("HGETALL", MB .. ":x:" .. ARGV[3])
    local x = hash(flat)
    local per = {}
    for r, t in ipairs(h[9]) do
      local k = box(t)
      local f = redis.call("HMGET", k.p, L.a, L.d)
      local log = {}
      for _, rec in ipairs(redis.call("LRANGE", k.g, 0, -1)) do
        if string.sub(rec, 1, 1) == L.name then log[#log + 1] = rec end
      end
      per[r] = {f[1] or "0", f[2] or "0", log, seq_of(ARGV[3], r, t, h[4], x) or 0}
    end
    return {epoch, {v, flat, per}}
  end
end
return {epoch, false}
"""

# ARGV[3] tenant ("" = every tenant), ARGV[4] limit.  Answer: the newest
# dead letters (JSON), newest first.
DEAD_LETTERS = _HEADER + """
local limit = tonumber(ARGV[4])
if limit <= 0 then return {epoch, {}} end
local tenants = {ARGV[3]}
if ARGV[3] == "" then tenants = redis.call("SMEMBERS", P .. ":tenants") end
local all = {}
for _, tenant in ipairs(tenants) do
  local got = redis.call("ZREVRANGE", base(tenant) .. ":dead", 0, limit - 1, "WITHSCORES")
  for k = 1, #got, 2 do all[#all + 1] = {tonumber(got[k + 1]), got[k]} end
end
table.sort(all, function(x, y) return x[1] > y[1] end)
local out = {}
for k = 1, math.min(limit, #all) do
  local member = all[k][2]
  out[k] = string.sub(member, string.find(member, "\\n", 1, true) + 1)
end
return {epoch, out}
"""

# ARGV[3] now, ARGV[4] cutoff (now - keep_acked), ARGV[5] dedup window.
# Deletes messages whose every recipient acked (or went dead) by the
# cutoff, as store_sqlite_writer.py's trim does: the acked ranges logged
# by the cutoff say which part of each inbox is done, and its entries
# there leave the list (the trimmed position ``z`` moves up); a single-
# recipient message there goes at once, a group message when each of its
# recipients is done (ended by the cutoff, or within its inbox's trimmed
# part), else its done entries keep their times in the message's ``x``
# hash while the range log goes.  Dedup buckets past the window go whole.
# Answer: how many messages went.
TRIM = _HEADER + """
local now, cut, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local width = window
if width < 1 then width = 1 end
local removed = 0
local function drop(MB, id, v)
  redis.call("DEL", MB .. ":m:" .. id, MB .. ":x:" .. id)
  redis.call("HINCRBY", MB .. ":n", "bytes", 0 - #v)
  redis.call("HINCRBY", MB .. ":n", "messages", -1)
  removed = removed + 1
end
-- The earliest time a logged range covered seq.
local function range_time(log, seq)
  local best
  for _, r in ipairs(log) do
    if r.first <= seq and seq <= r.last and (not best or r.at < best.at) then best = r end
  end
  return best and best.ats
end
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local B = base(tenant)
  local cand, order = {}, {}
  local function candidate(MB, id)
    local c = cand[id]
    if not c then
      c = {MB = MB, idx = {}}
      cand[id] = c
      order[#order + 1] = id
    end
    return c
  end
  for _, t in ipairs(redis.call("ZRANGEBYSCORE", B .. ":acked", "-inf", ARGV[4],
                                "LIMIT", 0, SWEEP)) do
    local k = box(t)
    local f = redis.call("HMGET", k.p, "z0", "z1")
    -- The range log is in time order: the records up to the cutoff lead it.
    local logs, old, done = {}, {}, false
    while not done do
      local got = redis.call("LRANGE", k.g, #old, #old + 199)
      if #got == 0 then break end
      for _, rec in ipairs(got) do
        local _, _, key, first, last, at = string.find(rec, "^(%d[da])(%d+) (%d+) (.*)$")
        if tonumber(at) > cut then
          done = true
          break
        end
        if not logs[key] then logs[key] = {} end
        local r = {rec = rec, key = key, first = tonumber(first), last = tonumber(last),
                   at = tonumber(at), ats = at}
        local list = logs[key]
        list[#list + 1] = r
        old[#old + 1] = r
      end
    end
    local hset, zs = {}, {}
    for lane = 0, 1 do
      local L = LANE[lane]
      local acks, dels = logs[L.al] or {}, logs[L.dl] or {}
      local done_to = 0
      for _, r in ipairs(acks) do
        if r.last > done_to then done_to = r.last end
      end
      local z = tonumber(f[lane + 1]) or 0
      if done_to > z then
        local list = k[L.name]
        each_entry(list, z, z + 1, done_to, function(s, member)
          local id, idx, mt, flags = entry_of(member)
          if not has(flags, "x") then
            local MB = base(mt)
            if has(flags, "1") then
              local v = redis.call("GET", MB .. ":m:" .. id)
              if v then drop(MB, id, v) end
            else
              candidate(MB, id).idx[tonumber(idx)] = {acked = range_time(acks, s),
                                                     delivered = range_time(dels, s)}
            end
          end
        end)
        redis.call("LTRIM", list, done_to - z, -1)
        hset[#hset + 1] = L.z
        hset[#hset + 1] = done_to
        z = done_to
      end
      zs[lane] = z
    end
    -- The old records go, but for deliveries of entries not trimmed yet
    -- (kept at the head: the next trim reads them again).
    local kept = {}
    for _, r in ipairs(old) do
      if r.last > zs[tonumber(string.sub(r.key, 1, 1))] then kept[#kept + 1] = r.rec end
    end
    if #old > 0 then
      redis.call("LTRIM", k.g, #old, -1)
      if #kept > 0 then bulk("LPUSH", k.g, kept) end
    end
    -- The oldest ack left puts the terminal back on the list for its time.
    local oldest, from = nil, #kept
    while not oldest do
      local got = redis.call("LRANGE", k.g, from, from + 199)
      if #got == 0 then break end
      for _, rec in ipairs(got) do
        local _, _, at = string.find(rec, "^%da%d+ %d+ (.*)$")
        if at then
          oldest = at
          break
        end
      end
      from = from + #got
    end
    if oldest then
      hset[#hset + 1] = "w"
      hset[#hset + 1] = oldest
      redis.call("ZADD", B .. ":acked", oldest, t)
    else
      redis.call("HDEL", k.p, "w")
      redis.call("ZREM", B .. ":acked", t)
    end
    bulk("HSET", k.p, hset)
  end
  local ended = redis.call("ZRANGEBYSCORE", B .. ":ended", "-inf", ARGV[4], "LIMIT", 0, SWEEP)
  for _, member in ipairs(ended) do
    local _, _, id, idx = string.find(member, "^(%d+) (%d+)$")
    local c = candidate(B, id)
    c.idx[tonumber(idx)] = c.idx[tonumber(idx)] or {}
  end
  bulk("ZREM", B .. ":ended", ended)
  for _, id in ipairs(order) do
    local c = cand[id]
    local MB = c.MB
    local v = redis.call("GET", MB .. ":m:" .. id)
    if v then
      local hd = head(v)
      local L = LANE[hd[4]]
      local x = hash(redis.call("HGETALL", MB .. ":x:" .. id))
      local done = true
      for r, t in ipairs(hd[9]) do
        local s = x["s" .. r]
        if c.idx[r] or s == "acked" then
          -- (done by this trim, or kept acked by an earlier one)
        elseif s == "expired" or s == "rejected" then
          if tonumber(x["e" .. r]) > cut then done = false end
        elseif (seq_of(id, r, t, hd[4], x) or 0) > (tonumber(redis.call("HGET", box(t).p, L.z)) or 0) then
          done = false
        end
        if not done then break end
      end
      if done then
        drop(MB, id, v)
      else
        for r, e in pairs(c.idx) do
          if e.acked then
            if e.delivered then
              redis.call("HSET", MB .. ":x:" .. id, "s" .. r, "acked", "a" .. r, e.acked,
                         "d" .. r, e.delivered)
            else
              redis.call("HSET", MB .. ":x:" .. id, "s" .. r, "acked", "a" .. r, e.acked)
            end
          end
        end
      end
    end
  end
  -- Messages without recipients are done when stored.
  for _, id in ipairs(redis.call("ZRANGEBYSCORE", B .. ":done", "-inf", ARGV[4], "LIMIT", 0,
                                 SWEEP)) do
    local v = redis.call("GET", B .. ":m:" .. id)
    if v then drop(B, id, v) end
    redis.call("ZREM", B .. ":done", id)
  end
  -- Dedup buckets whose every entry is past the window.
  local old = math.floor(now / width) - 3
  for _, b in ipairs(redis.call("ZRANGEBYSCORE", B .. ":ddb", "-inf", old)) do
    redis.call("DEL", B .. ":dd:" .. b)
    redis.call("ZREM", B .. ":ddb", b)
  end
end
return {epoch, removed}
"""

# Answer: {messages, unacked, dead letters, bytes} summed over tenants.
STATS = _HEADER + """
local sums = {0, 0, 0, 0}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local f = redis.call("HMGET", base(tenant) .. ":n", "messages", "unacked", "dead", "bytes")
  for k = 1, 4 do sums[k] = sums[k] + (tonumber(f[k]) or 0) end
end
return {epoch, sums}
"""

# What :meth:`RedisStore.open` runs: the header, and the key layout's
# version.  A store written by a Tillwire with another layout (``<p>:layout``
# missing while messages are held, or different) is refused: answer
# {epoch, the layout found}.
LAYOUT = "2"
EPOCH = _HEADER + """
local layout = redis.call("GET", P .. ":layout")
if not layout then
  if redis.call("SCARD", P .. ":tenants") > 0 then return {epoch, "1"} end
  redis.call("SET", P .. ":layout", ARGV[3])
  layout = ARGV[3]
end
return {epoch, layout}
"""
