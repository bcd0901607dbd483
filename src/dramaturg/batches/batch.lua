-- Every step that changes a batch, atomically (see dramaturg/batches/state.py).
--
-- KEYS[1]: the prefix of batch keys, "<namespace>:__batch__:". A batch <id> has
--   <prefix><id>      hash: name, created_at, sealed, total, running, succeeded, failed,
--                     held, cancelled, on_complete/on_success (the callbacks' messages, JSON),
--                     complete/success ("firing" once fired, "sent" once published),
--                     finished_at, parent, parent_member, cancel_requested_by/_at
--   <prefix><id>:m    hash: member message id -> a number: 1 sent, 2 running; once ended,
--                     ten times its end (1 succeeded, 2 failed: rejected, 3 held, counted
--                     as failed too, 4 cancelled: ended, neither succeeded nor failed), plus
--                     what it was before (0 to 2). So an end is one HINCRBY, whose answer
--                     tells what the member was: see member_ends. (Until 2026-12-03 the
--                     states were letters, p r s f h c: a member found so is written as
--                     its number first, see as_number; a producer or worker of that version
--                     may still write them.)
--   <prefix><id>:p    hash: running member -> "<fraction>|<text>" (its last progress())
-- ARGV[1]: the operation; the rest are its arguments:
--   add   <id> <member>...                  -> members new to it (-1: no such batch)
--   seal  <id> <now ms> <ttl ms>            -> the events that fire (see fire()); -1: no batch
--   drop  <id> <now ms> <ttl ms> <member>... -> members added but certainly not sent leave
--                                              it (those still sent, not running); what fires then
--   end   <now ms> <ttl ms> (<id> <s|f|h|c> <count> <member>...)...
--                                           -> the ends that fire events, as pairs: the
--                                              end's place in the call (from 1), the events
--                                              (a batch's go to its last end here; a batch
--                                              that is gone fires nothing). Grouped by batch
--                                              and outcome, one argument a member, and an
--                                              answer only for what fired (against a triple
--                                              and an answer each: 0.8 us of the caller's CPU
--                                              and 0.6 us of Redis's less a member, 33 a call)
--   owned-end <now ms> <ttl ms> (...)       -> the same, for a caller that keeps the
--                                              member's message unacknowledged until what
--                                              fires is published (the acknowledgements'
--                                              ends): not put in the firing index
--   owned-end-from <now ms> <ttl ms> <ends> -> owned-end, of the ends the iterator <ends>
--                                              yields (settle.lua's; only where batch.lua
--                                              is a Lua function, as settle.lua has it)
--   note  (<id> <member> <r|w|g> <value>)...  running, waiting again, progress; best effort
--   sent  <id> <event>                      -> the event's callback was published
--   disown <id>                             -> its firing events go into the firing index (an
--                                              owner that stops trying them: 1), or 0
--   stale <older ms> <limit>                -> ids of batches with an event firing for longer
--                                              than that (Redis's clock), each taken for
--                                              another <older ms> (see the firing index)
--
-- The firing index, <prefix>~firing (sorted set: batch id -> when it started firing, Redis
-- time in ms): a batch is in it from the step that fires an event until every event it
-- fired is "sent". A callback whose publish failed where nothing tries it again (an end
-- written from a worker's after-hook, a seal) is found there by `stale` and published
-- again (BatchTracker.refire). What an owned-end fires is not put there: its caller tries
-- until it is out, and if it dies the member is delivered again and fires it again (the
-- Redis broker's settle.lua disowns a batch none of whose messages in its call is still
-- held, so that the sweep finds it there).
--
-- Members are counted by message id: an end that repeats changes nothing, and a member
-- leaves "succeeded" never (a redelivered copy of a task that succeeded does not undo it).

local prefix = KEYS[1]
local op = ARGV[1]

-- The events that fire now on batch `meta` (comma-joined, "" for none): "complete" once
-- it is sealed and every member has ended, "success" once every member succeeded.
-- Compare-and-set: an event fires once; a repeated end of the same member (a member
-- redelivered after its worker died between firing and publishing) fires it again while
-- it is "firing", and the callback's message id, derived from batch id and event, makes
-- that the same message.
local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- `f`: the batch's fields as this HMGET reads them, if the caller has them already.
local function fire(meta, now, ttl, repeated, owned, f)
  f = f or redis.call('HMGET', meta, 'sealed', 'total', 'succeeded', 'failed', 'complete', 'success', 'cancelled')
  if f[1] ~= '1' then return '' end
  local total, succeeded, failed = tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
  if succeeded + failed + (tonumber(f[7]) or 0) < total then return '' end
  local events = {}
  if not f[5] then
    redis.call('HSET', meta, 'complete', 'firing', 'finished_at', now)
    for _, key in ipairs({meta, meta .. ':m', meta .. ':p'}) do
      redis.call('PEXPIRE', key, ttl)
    end
    events[#events + 1] = 'complete'
  elseif f[5] == 'firing' and repeated then
    events[#events + 1] = 'complete'
  end
  if succeeded == total then
    if not f[6] then
      redis.call('HSET', meta, 'success', 'firing')
      events[#events + 1] = 'success'
    elseif f[6] == 'firing' and repeated then
      events[#events + 1] = 'success'
    end
  end
  if #events > 0 and not owned then
    -- Dated now, also when it was there already (an earlier event unpublished): its
    -- publisher is at work now, and the sweep leaves it a minute.
    redis.call('ZADD', prefix .. '~firing', redis_ms(), string.sub(meta, #prefix + 1))
  end
  return table.concat(events, ',')
end

if op == 'add' then
  local meta = prefix .. ARGV[2]
  if redis.call('EXISTS', meta) == 0 then return -1 end
  local members = meta .. ':m'
  local added = 0
  for i = 3, #ARGV do
    added = added + redis.call('HSETNX', members, ARGV[i], '1')
  end
  if added > 0 then redis.call('HINCRBY', meta, 'total', string.format('%d', added)) end
  return added
end

if op == 'seal' then
  local meta = prefix .. ARGV[2]
  if redis.call('EXISTS', meta) == 0 then return -1 end
  redis.call('HSET', meta, 'sealed', '1')
  return fire(meta, ARGV[3], tonumber(ARGV[4]), false)
end

if op == 'drop' then
  local meta = prefix .. ARGV[2]
  if redis.call('EXISTS', meta) == 0 then return -1 end
  local members = meta .. ':m'
  local dropped = 0
  for i = 5, #ARGV do
    local state = redis.call('HGET', members, ARGV[i])
    if state == '1' or state == 'p' then
      redis.call('HDEL', members, ARGV[i])
      dropped = dropped + 1
    end
  end
  if dropped > 0 then redis.call('HINCRBY', meta, 'total', string.format('%d', -dropped)) end
  return fire(meta, ARGV[3], tonumber(ARGV[4]), false)
end

-- A member's state as the version before wrote it (a letter) as the number it has now.
local function as_number(letter)
  if letter == 'p' then return '1' elseif letter == 'r' then return '2' elseif letter == 's' then return '10'
  elseif letter == 'f' then return '20' elseif letter == 'h' then return '30' elseif letter == 'c' then return '40' end
  error('batch.lua: a member state neither a number nor a letter: ' .. tostring(letter))
end

-- The ends of members as the iterator `ends` yields them (batch id, end code, member id,
-- and the end's place, which the answer names), written: each batch's fields read once per
-- call, in one HMGET; each member's end one HINCRBY (see below); the counts' changes added
-- up and written once per batch and count; what fires decided once per batch, and
-- answered at its last end in the call (any thread of the group may publish it: none of
-- their messages is acknowledged yet). One table per batch per call, and none per member:
-- a redis.call costs Redis a microsecond or two (its command, and its reply made and read
-- back), and each new Lua table some more; those are what a member's end costs here.
-- Answers the ends that fire events, as pairs: the place, the events.
local function member_ends(now, ttl, owned, ends)
  local batches, out = {}, {}
  for id, new, member, place in ends do
    local st = batches[id]
    if st == nil then
      local meta = prefix .. id
      local f = redis.call('HMGET', meta, 'sealed', 'total', 'succeeded', 'failed', 'complete', 'success',
        'cancelled')
      -- counts: this call's changes of total, running, succeeded, failed, held, cancelled;
      -- progress: whether the batch has a progress hash at all, looked up at its first
      -- member that changes here (most have none, and then no member's is there to delete).
      st = {meta = meta, members = meta .. ':m', f = f, last = place, repeated = false, counts = {0, 0, 0, 0, 0, 0},
        progress = nil}
      batches[id] = st
    end
    local f = st.f
    if f[1] then  -- every batch has "sealed"; a batch that is gone fires nothing (no key made again)
      st.last = place
      local c = st.counts
      -- The member's number goes up by ten times its end: from 0 (not a member: counted now),
      -- 1 (sent) or 2 (running) nearly always, its first end, one call. (A string: Redis
      -- would write a Lua number out with printf's %.17g, a microsecond's work.)
      local code, by = 4, '40'
      if new == 's' then code, by = 1, '10' elseif new == 'f' then code, by = 2, '20'
      elseif new == 'h' then code, by = 3, '30' end
      local was = redis.pcall('HINCRBY', st.members, member, by)
      if type(was) == 'table' then  -- a letter, written by the version before
        redis.call('HSET', st.members, member, as_number(redis.call('HGET', st.members, member)))
        was = redis.call('HINCRBY', st.members, member, by)
      end
      was = was - 10 * code
      if was >= 10 then
        -- It had ended already (run again after its worker died, or kicked): the run before
        -- may have left the batch firing, its callbacks unpublished; they go out again
        -- (their ids are the same), however this run ended. Succeeded stays succeeded; a
        -- failure, held or cancelled member that ends otherwise now moves.
        st.repeated = true
        local before = math.floor(was / 10)
        if before == code or before == 1 then
          redis.call('HSET', st.members, member, string.format('%d', was))
          code = nil
        else
          redis.call('HSET', st.members, member, by)
          if before == 4 then c[6] = c[6] - 1 else c[4] = c[4] - 1 end
          if before == 3 then c[5] = c[5] - 1 end
        end
      elseif was == 0 then
        c[1] = c[1] + 1
      elseif was == 2 then
        c[2] = c[2] - 1
      end
      if code then
        if code == 1 then
          c[3] = c[3] + 1
        elseif code == 4 then
          c[6] = c[6] + 1
        else
          c[4] = c[4] + 1
          if code == 3 then c[5] = c[5] + 1 end
        end
        if st.progress == nil then st.progress = redis.call('EXISTS', st.meta .. ':p') == 1 end
        if st.progress then redis.call('HDEL', st.meta .. ':p', member) end
      end
    end
  end
  for _, st in pairs(batches) do
    local f, c = st.f, st.counts
    if f[1] then
      local meta = st.meta
      if c[1] ~= 0 then redis.call('HINCRBY', meta, 'total', string.format('%d', c[1])) end
      if c[2] ~= 0 then redis.call('HINCRBY', meta, 'running', string.format('%d', c[2])) end
      if c[3] ~= 0 then redis.call('HINCRBY', meta, 'succeeded', string.format('%d', c[3])) end
      if c[4] ~= 0 then redis.call('HINCRBY', meta, 'failed', string.format('%d', c[4])) end
      if c[5] ~= 0 then redis.call('HINCRBY', meta, 'held', string.format('%d', c[5])) end
      if c[6] ~= 0 then redis.call('HINCRBY', meta, 'cancelled', string.format('%d', c[6])) end
      -- With what this call added: the counts as they are now. Nothing can fire before every
      -- member has ended (nearly every call: no fire() and no table for it).
      local total, succeeded, failed, cancelled = tonumber(f[2]) + c[1], tonumber(f[3]) + c[3],
        tonumber(f[4]) + c[4], (tonumber(f[7]) or 0) + c[6]
      if f[1] == '1' and succeeded + failed + cancelled >= total then
        local events = fire(meta, now, ttl, st.repeated, owned, {f[1], total, succeeded, failed, f[5], f[6], cancelled})
        if events ~= '' then
          out[#out + 1] = st.last
          out[#out + 1] = events
        end
      end
    end
  end
  return out
end

if op == 'end' or op == 'owned-end' then
  -- The ends in ARGV's groups (batch id, code, count, members), each's place its number
  -- among them.
  local n, i, j, last_j, id, new = 0, 4, 1, 0, nil, nil
  local function ends()
    while j > last_j do
      if i > #ARGV then return nil end
      id, new = ARGV[i], ARGV[i + 1]
      j, last_j = i + 3, i + 2 + tonumber(ARGV[i + 2])
      i = last_j + 1
    end
    n, j = n + 1, j + 1
    return id, new, ARGV[j - 1], n
  end
  return member_ends(ARGV[2], tonumber(ARGV[3]), op == 'owned-end', ends)
end

if op == 'owned-end-from' then
  -- For settle.lua, which has batch.lua as a function: the ends its iterator ARGV[4] yields
  -- (the places are its own); as owned-end.
  return member_ends(ARGV[2], tonumber(ARGV[3]), true, ARGV[4])
end

if op == 'note' then
  -- No EXISTS: a batch that expired has no members, so nothing below matches (and no key
  -- is made again).
  for i = 2, #ARGV, 4 do
    local meta, member, kind = prefix .. ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local members = meta .. ':m'
    local state = redis.call('HGET', members, member)
    if kind == 'r' and (state == '1' or state == 'p') then
      redis.call('HSET', members, member, '2')
      redis.call('HINCRBY', meta, 'running', '1')
    elseif kind == 'w' and (state == '2' or state == 'r') then
      redis.call('HSET', members, member, '1')
      redis.call('HINCRBY', meta, 'running', '-1')
      redis.call('HDEL', meta .. ':p', member)
    elseif kind == 'g' and (state == '2' or state == '1' or state == 'r' or state == 'p') then
      redis.call('HSET', meta .. ':p', member, ARGV[i + 3])
    end
  end
  return 0
end

if op == 'sent' then
  local meta = prefix .. ARGV[2]
  if redis.call('HGET', meta, ARGV[3]) == 'firing' then
    redis.call('HSET', meta, ARGV[3], 'sent')
  end
  local f = redis.call('HMGET', meta, 'complete', 'success')
  if f[1] ~= 'firing' and f[2] ~= 'firing' then
    redis.call('ZREM', prefix .. '~firing', ARGV[2])
  end
  return 0
end

if op == 'disown' then
  local f = redis.call('HMGET', prefix .. ARGV[2], 'complete', 'success')
  if f[1] ~= 'firing' and f[2] ~= 'firing' then return 0 end
  redis.call('ZADD', prefix .. '~firing', redis_ms(), ARGV[2])
  return 1
end

if op == 'stale' then
  -- Batches firing for longer than ARGV[2] ms; each one returned is taken for as long
  -- again (its score moved to now), so that the workers sweeping at once publish it once.
  -- A batch gone (expired) or with nothing firing any more leaves the index.
  local index = prefix .. '~firing'
  local now = redis_ms()
  local found = redis.call('ZRANGEBYSCORE', index, '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
  local out = {}
  for _, id in ipairs(found) do
    local f = redis.call('HMGET', prefix .. id, 'complete', 'success')
    if f[1] == 'firing' or f[2] == 'firing' then
      redis.call('ZADD', index, 'XX', now, id)
      out[#out + 1] = id
    else
      redis.call('ZREM', index, id)
    end
  end
  return out
end

return redis.error_reply('batch.lua: unknown operation ' .. tostring(op))
