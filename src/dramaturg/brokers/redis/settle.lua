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
-- The end is written first, in this same script (batch_end, batch.lua's "owned-end" prepended
-- by settling.py), so it is durable no later than the acknowledgement and costs no call of
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

-- The batch ends, by batch keys' prefix and ttl, in the order they come: batch_end's
-- arguments (runs of one batch and code under one header: batch, code, count, members),
-- the place in ARGV of each end's message (batch_end answers an end's place among its
-- own), and each place's batch.
local groups, by_key, batch_at = {}, {}, {}
local group, batch, code, run  -- run: the place in group.args of the current run's count
local i = 3
while i <= #ARGV do
    local kind = ARGV[i]
    if kind == "m" then
        i = i + 6
    elseif kind == "B" then
        local key = ARGV[i + 1] .. " " .. ARGV[i + 2]
        group = by_key[key]
        if group == nil then
            group = {prefix = ARGV[i + 1], args = {"owned-end", now, ARGV[i + 2]}, at = {}, of = {}}
            by_key[key] = group
            groups[#groups + 1] = group
        end
        batch, code, run = ARGV[i + 3], ARGV[i + 4], nil
        i = i + 5
    elseif kind == "A" or kind == "N" or kind == "AM" or kind == "NM" then
        local args = group.args
        if run == nil then  -- the first end since the "B" entry
            args[#args + 1] = batch
            args[#args + 1] = code
            args[#args + 1] = 0
            run = #args
        end
        args[run] = args[run] + 1
        local width = (kind == "AM" or kind == "NM") and 4 or 3
        args[#args + 1] = ARGV[i + width - 1]  -- the member id
        group.at[#group.at + 1] = i
        batch_at[i] = batch
        local same = group.of[batch]  -- the places of this batch's ends in the call
        if same == nil then
            same = {}
            group.of[batch] = same
        end
        same[#same + 1] = i
        i = i + width
    else
        i = i + 3
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
for _, group in ipairs(groups) do
    local out = batch_end({group.prefix}, group.args)
    for j = 1, #out, 2 do
        local at = group.at[out[j]]
        local batch = batch_at[at]
        local same, holder = group.of[batch], nil
        for k = #same, 1, -1 do
            local place = same[k]
            local claims = namespace .. ":__acks__." .. worker .. "." .. ARGV[place + 1]
            if redis.call("sismember", claims, ARGV[place + 2]) == 1 then
                holder = place
                break
            end
        end
        if holder == nil then
            batch_end({group.prefix}, {"disown", batch})
            holder = at
        end
        fires[holder] = out[j + 1]
        kept = kept or {}
        kept[ARGV[holder + 1] .. " " .. ARGV[holder + 2]] = true
    end
end

local answers = {}
i = 3
while i <= #ARGV do
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
