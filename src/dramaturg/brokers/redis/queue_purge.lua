-- Drops up to ARGV[1] messages waiting in lists, from their heads, and returns how many
-- ids it took followed by (list's index in KEYS, id, body) for each that had a body
-- (dramaturg queue purge calls it until the lists are empty, so that no single call blocks
-- Redis for long; it gives a step's tasks back with queue_give_back.lua when their records
-- cannot be written).
-- Only ids still in a list go: a claimed (running) message's id is in its worker's claim
-- set, not in the list, so its body stays. Each call is atomic, so a worker's fetch
-- (fetch.lua) takes an id either before (it runs) or never (it is purged).
-- KEYS: pairs of (list, bodies hash). ARGV: the most ids to take.
local left = tonumber(ARGV[1])
local taken = 0
local found = {0}
for i = 1, #KEYS, 2 do
    if left <= 0 then
        break
    end
    local ids = redis.call("lrange", KEYS[i], 0, left - 1)
    if #ids > 0 then
        redis.call("ltrim", KEYS[i], #ids, -1)
        for first = 1, #ids, 1000 do
            local chunk = {unpack(ids, first, math.min(first + 999, #ids))}
            local bodies = redis.call("hmget", KEYS[i + 1], unpack(chunk))
            redis.call("hdel", KEYS[i + 1], unpack(chunk))
            for k = 1, #chunk do
                if bodies[k] then
                    found[#found + 1] = i
                    found[#found + 1] = chunk[k]
                    found[#found + 1] = bodies[k]
                end
            end
        end
        taken = taken + #ids
        left = left - #ids
    end
end
found[1] = taken
return found
