-- Acknowledges or rejects claimed messages of one worker, as Dramatiq's ack and nack commands
-- do one by one, and answers each: 1 if it was still claimed (and is settled now); else
-- nothing changes (the body is another holder's), and 0 while the body is there (another
-- worker recovered the message while this one was taken for dead: it runs again), -1 once it
-- is gone (settled already: by an earlier try whose reply was lost, or by the worker that
-- ran it again). A rejected message goes into its queue's dead letters.
--
-- A message that is a batch member carries its end: "A" or "N" instead of "a" or "n", its
-- member id being its Redis id (as for every message sent new), or "AM" / "NM" with its
-- member id after its Redis id. The rest of the end comes once per call where it changes,
-- in a "B" entry before it: the batch keys' prefix, the batches' ttl (ms), the batch id and
-- the end code. A call of one batch's members sent new has as many arguments as plain
-- acknowledgements, and five more.
-- The end is written first, in this same script (batch_end, batch.lua's "owned-end-from",
-- batch.lua being prepended by settling.py as a function), so it is durable no later than the acknowledgement and costs no call of
-- its own. The ends of a call go to batch_end together, one call of it per batch keys'
-- prefix and ttl: each batch is looked up, its members read and written, its counts changed
-- and what fires decided once per call, not once per member (each redis.call costs Redis a
-- microsecond or more besides the command). If the ends fire callbacks, one message of that
-- batch in the call that this worker still holds keeps them (see below): it is NOT settled
-- and its answer is
-- "fire:<events>": the worker publishes them, then settles it alone (a worker killed in
-- between runs the member again; its repeated end fires them again, with the same ids).
-- A message put back to wait for a limit ("m", dramaturg.flow) is acknowledged and its copy
-- enqueued in one step: the copy's queue (the delay queue), its Redis id and its body follow.
-- The copy is written only if the message was still claimed, so a worker taken for dead
-- meanwhile (whose message another worker recovered) queues no second copy; a try run again
-- after its reply was lost finds the message settled and its copy written once: it answers 2
-- while that copy still waits (so that the sender's after-enqueue hooks run for it), else -1.
-- KEYS: namespace; ARGV: worker id, now (ms), then per message: "a", "n" or "m", its queue, its
-- Redis id (for "AM"/"NM" its member id after it, for "m" the copy's three); "B" entries
-- between them, as above
local namespace, worker, now = KEYS[1], ARGV[1], ARGV[2]
local n = #ARGV

-- The batch keys' prefixes and ttls of the call's "B" entries, each once (nearly always one,
-- or none). Nothing is built per message: the ends are read from ARGV where they are.
local groups = nil
local i = 3
while i <= n do
    local kind = ARGV[i]
    if kind == "B" then
        local known = false
        for _, group in ipairs(groups or {}) do
            known = known or (group[1] == ARGV[i + 1] and group[2] == ARGV[i + 2])
        end
        if not known then
            groups = groups or {}
            groups[#groups + 1] = {ARGV[i + 1], ARGV[i + 2]}
        end
        i = i + 5
    elseif kind == "m" then
        i = i + 6
    elseif kind == "AM" or kind == "NM" then
        i = i + 4
    else
        i = i + 3
    end
end

-- The ends of the call under the batch keys' prefix and ttl of `group`, as batch_end's
-- owned-end-from takes them: an iterator of batch id, end code, member id and the place in
-- ARGV of its message. `batch`: only that batch's.
local function ends_of(group, batch)
    local k, id, code, mine = 3, nil, nil, false
    return function()
        while k <= n do
            local kind, at = ARGV[k], k
            if kind == "B" then
                mine = ARGV[k + 1] == group[1] and ARGV[k + 2] == group[2]
                id, code = ARGV[k + 3], ARGV[k + 4]
                k = k + 5
            elseif kind == "A" or kind == "N" then
                k = k + 3
                if mine and (batch == nil or id == batch) then return id, code, ARGV[at + 2], at end
            elseif kind == "AM" or kind == "NM" then
                k = k + 4
                if mine and (batch == nil or id == batch) then return id, code, ARGV[at + 3], at end
            elseif kind == "m" then
                k = k + 6
            else
                k = k + 3
            end
        end
        return nil
    end
end

-- What fires is kept by a message of the batch that this worker still holds (the last
-- such in the call): it is not settled, and if the worker dies before publishing, the
-- member runs again and its repeated end fires it again. A batch may have none held here
-- any more (a call tried again after its reply was lost, whose first try settled them;
-- messages recovered by another worker meanwhile): then the batch goes to the firing
-- index, whose sweep publishes what this worker does not, and its last end in the call
-- answers the events all the same, for this worker to publish at once.
local fires = {}  -- place in ARGV -> the events it keeps
local kept = nil  -- "<queue> <redis id>" of the messages that keep them (nil: none)
for _, group in ipairs(groups or {}) do
    local out = batch_end({group[1]}, {"owned-end-from", now, group[2], ends_of(group)})
    for j = 1, #out, 2 do
        local at = out[j]
        local batch, holder = nil, nil
        for id, _, _, place in ends_of(group) do  -- the batch of the end at `at`
            if place == at then batch = id end
        end
        for _, _, _, place in ends_of(group, batch) do  -- its last end whose message is held here
            local claims = namespace .. ":__acks__." .. worker .. "." .. ARGV[place + 1]
            if redis.call("sismember", claims, ARGV[place + 2]) == 1 then holder = place end
        end
        if holder == nil then
            batch_end({group[1]}, {"disown", batch})
            holder = at
        end
        fires[holder] = out[j + 1]
        kept = kept or {}
        kept[ARGV[holder + 1] .. " " .. ARGV[holder + 2]] = true
    end
end

local answers = {}
i = 3
while i <= n do
    if ARGV[i] == "B" then
        i = i + 5
    else
        local kind, queue, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
        local bodies = namespace .. ":" .. queue .. ".msgs"
        local answer, copy
        local fired = fires[i]
        if kind == "m" then
            copy = {ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]}
            kind = "a"
            i = i + 6
        elseif kind == "A" or kind == "N" then
            kind = string.lower(kind)
            i = i + 3
        elseif kind == "AM" or kind == "NM" then
            kind = string.lower(string.sub(kind, 1, 1))
            i = i + 4
        else
            i = i + 3
        end
        if fired then
            answer = "fire:" .. fired
        elseif kept and kept[queue .. " " .. id] then
            -- The same message twice in the call (run twice here: this worker taken for dead
            -- meanwhile, and the message fetched again), and its other entry keeps what fired:
            -- left claimed for it, as if another worker held it.
            answer = 0
        elseif redis.call("srem", namespace .. ":__acks__." .. worker .. "." .. queue, id) == 1 then
            if kind == "n" then
                local body = redis.call("hget", bodies, id)
                if body then
                    local dead = namespace .. ":" .. string.gsub(queue, "%.DQ$", "") .. ".XQ"
                    redis.call("zadd", dead, now, id)
                    redis.call("hset", dead .. ".msgs", id, body)
                end
            end
            if copy then
                local target = namespace .. ":" .. copy[1]
                if redis.call("hsetnx", target .. ".msgs", copy[2], copy[3]) == 1 then
                    redis.call("rpush", target, copy[2])
                end
            end
            redis.call("hdel", bodies, id)
            answer = 1
        elseif redis.call("hexists", bodies, id) == 1 then
            answer = 0
        elseif copy and redis.call("hexists", namespace .. ":" .. copy[1] .. ".msgs", copy[2]) == 1 then
            answer = 2  -- settled by an earlier try whose reply was lost: its copy is there, still waiting
        else
            answer = -1
        end
        answers[#answers + 1] = answer
    end
end
return answers
