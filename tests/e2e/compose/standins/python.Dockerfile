# Stand-in for the official python:3.11-slim (Debian's python3.11 on bookworm): python,
# python3 and pip on PATH, pip may install system-wide, C.UTF-8, CMD python3.
FROM roomcast-standin/bookworm
RUN rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED
ENV LANG=C.UTF-8
CMD ["python3"]
