#!/usr/bin/env bash
# Extract clean plain-text Bibles and build the tiny-kjv data split.
#
# Needs these Debian packages (this script installs nothing):
#   bible-kjv bible-kjv-text   -> `bible`     (King James Version, public domain)
#   sword-text-web diatheke    -> `diatheke`  (World English Bible, module engWEB2015eb, public domain)
#   perl (perl-base), coreutils, awk
# i.e.  apt-get install bible-kjv bible-kjv-text sword-text-web diatheke
#
# Usage:  tools/extract_bible.sh [WORKDIR]        (run from the repository root)
#
# Writes into WORKDIR (default ${TMPDIR:-/tmp}/mopt-bible; not committed):
#   kjv.tsv        "Book<TAB>chapter:verse<TAB>text", all 31102 KJV verses, canonical order
#   web.tsv        same layout for the WEB, 66-book Protestant canon (no deuterocanon)
#   kjv-train.txt  KJV training text: every non-held-out book, one verse per line,
#                  a line "@@BOOK <name>" before each book (the trainer uses it as a
#                  document separator; it is not text)
# and into data/ (committed, plain UTF-8, one verse per line, no references):
#   kjv-heldout.txt  the held-out KJV books, complete, in canonical order
#   web-heldout.txt  the same held-out books in the WEB
#   kjv-calib.txt    ~100 KB of the KJV TRAINING books (every 40th block of 20 verses)
#
# Held-out books (about 5% of the KJV text, both testaments):
#   OT: Ruth, Esther, Ecclesiastes, Lamentations, Joel, Jonah
#   NT: Mark, Philippians, Titus, Jude
set -euo pipefail
export LC_ALL=C.UTF-8

WORK=${1:-${TMPDIR:-/tmp}/mopt-bible}
DATA=data
mkdir -p "$WORK" "$DATA"

HELDOUT="Ruth|Esther|Ecclesiastes|Lamentations|Joel|Jonah|Mark|Philippians|Titus|Jude"

# KJV abbreviation used by `bible` -> canonical name (also the diatheke key for the WEB).
BOOKS='Ge:Genesis Exo:Exodus Lev:Leviticus Num:Numbers Deu:Deuteronomy Josh:Joshua
Jdgs:Judges Ruth:Ruth 1Sm:1_Samuel 2Sm:2_Samuel 1Ki:1_Kings 2Ki:2_Kings
1Chr:1_Chronicles 2Chr:2_Chronicles Ezra:Ezra Neh:Nehemiah Est:Esther Job:Job
Psa:Psalms Prv:Proverbs Eccl:Ecclesiastes SSol:Song_of_Solomon Isa:Isaiah
Jer:Jeremiah Lam:Lamentations Eze:Ezekiel Dan:Daniel Hos:Hosea Joel:Joel Amos:Amos
Obad:Obadiah Jonah:Jonah Mic:Micah Nahum:Nahum Hab:Habakkuk Zep:Zephaniah
Hag:Haggai Zec:Zechariah Mal:Malachi Mat:Matthew Mark:Mark Luke:Luke John:John
Acts:Acts Rom:Romans 1Cor:1_Corinthians 2Cor:2_Corinthians Gal:Galatians
Eph:Ephesians Phi:Philippians Col:Colossians 1Th:1_Thessalonians
2Th:2_Thessalonians 1Tim:1_Timothy 2Tim:2_Timothy Titus:Titus Phmn:Philemon
Heb:Hebrews Jas:James 1Pet:1_Peter 2Pet:2_Peter 1Jn:1_John 2Jn:2_John 3Jn:3_John
Jude:Jude Rev:Revelation'

# ---------------------------------------------------------------- KJV
# `bible -f` prints one verse per line as "Ge1:1 In the beginning ...".
echo "extracting KJV ..." >&2
bible -f gen1:1-rev22:21 </dev/null |
  BOOKS="$BOOKS" perl -CSD -ne '
    BEGIN { for (split /\s+/, $ENV{BOOKS}) { my ($a, $n) = split /:/; $n =~ tr/_/ /; $name{$a} = $n } }
    chomp; s/\r//g;
    /^(\d?[A-Za-z]+)(\d+:\d+) (.*)$/ or die "unexpected KJV line: $_\n";
    my ($abbr, $ref, $t) = ($1, $2, $3);
    defined $name{$abbr} or die "unknown KJV book abbreviation $abbr\n";
    $t =~ s/\s+/ /g; $t =~ s/^ | $//g;
    print "$name{$abbr}\t$ref\t$t\n" if length $t;
  ' > "$WORK/kjv.tsv"
n=$(wc -l < "$WORK/kjv.tsv")
[ "$n" -eq 31102 ] || { echo "KJV: expected 31102 verses, got $n" >&2; exit 1; }

# ---------------------------------------------------------------- WEB
# diatheke is queried one book at a time: a single Genesis-Revelation range query
# in diatheke 1.9 leaks Psalm-title markup into every later verse and also
# returns the deuterocanon. "-o n" turns on Strong's numbers ("God <H0430>created");
# the tags are replaced by a space, which also restores the word boundaries that
# the plain rendering loses ("Godcreated"). Layout of diatheke's output:
#   "Book C:V: text"       starts a verse
#   other non-blank lines  continuation lines of the current verse (poetry lines,
#                          also paragraphs after a blank line inside a verse)
#   "  Book C:V: text"     an INDENTED verse line is preceded by a heading: the
#                          non-blank line just before it is a Psalm
#                          title (diatheke repeats it before every verse of the
#                          psalm) or a Hebrew letter of Psalm 119 -> dropped
#   text after the last verse of Revelation: the WEB glossary -> dropped
#   "(engWEB2015eb)"       trailer -> dropped
#   "Friends  We will ..." speaker labels of the Song of Solomon (two spaces) -> dropped
# Dropped lines are logged to $WORK/web-dropped.txt for inspection.
echo "extracting WEB ..." >&2
: > "$WORK/web.tsv"
: > "$WORK/web-dropped.txt"
for pair in $BOOKS; do
  book=${pair#*:}; book=${book//_/ }
  diatheke -b engWEB2015eb -o n -f plain -k "$book" </dev/null |
    BOOK="$book" DROP="$WORK/web-dropped.txt" perl -CSD -ne '
      BEGIN { $book = $ENV{BOOK}; $cur = undef; @pend = (); open DROP, ">>", $ENV{DROP} or die "$ENV{DROP}: $!" }
      sub flush {
        return unless defined $cur;
        my $t = $cur;
        $t =~ s/\s*<[HG]\d+[a-z]?>\s*/ /g;                # Strong numbers
        $t =~ s/(^|[\s\x{201D}.,;:!?])(?:Beloved|Friends|Lover|Brothers)(?: <[HG]\d+>)?\s{2,}/$1 /g
          if $book eq "Song of Solomon";                   # speaker labels
        $t =~ s/\s+/ /g; $t =~ s/^ | $//g;
        $t =~ s/ +([,.;:!?\x{201D}\x{2019})\]])/$1/g;   # no space before closing punctuation
        $t =~ s/([\x{201C}\x{2018}(\[]) +/$1/g;          # nor after opening quotes/brackets
        $t =~ s/ *\x{2014} */\x{2014}/g;                  # em dash is unspaced in the WEB
        print "$book\t$ref\t$t\n" if length $t;
        $cur = undef;
      }
      sub commit { if (defined $cur) { $cur .= " $_" for @pend; @pend = () } else { drop() } }
      sub drop   { print DROP "$book: $_\n" for @pend; @pend = () }
      chomp; s/\r//g;
      next if /^\s*\(engWEB2015eb\)\s*$/;
      $glossary = 1 if /The following words used in the World English Bible/;
      if ($glossary) { print DROP "$book: $_\n"; next }
      if (/^(\s*)(?:[IV]+ )?[A-Z][A-Za-z ]*? (\d+:\d+):\s?(.*)$/) {
        if (length $1 && @pend) { my $h = pop @pend; commit(); push @pend, $h; drop() } else { commit() }
        flush(); $ref = $2; $cur = $3; next;
      }
      if (/^\s*$/) { commit(); next }
      push @pend, $_;
      END { commit(); flush() }
    ' >> "$WORK/web.tsv"
done
if grep -q '<' "$WORK/web.tsv"; then echo "WEB: markup left over" >&2; grep -m5 '<' "$WORK/web.tsv" >&2; exit 1; fi
echo "WEB: $(wc -l < "$WORK/web.tsv") verses, $(wc -l < "$WORK/web-dropped.txt") heading lines dropped (see $WORK/web-dropped.txt)" >&2

# ---------------------------------------------------------------- split
awk -F'\t' -v re="^($HELDOUT)\$" '$1 ~ re { print $3 }' "$WORK/kjv.tsv" > "$DATA/kjv-heldout.txt"
awk -F'\t' -v re="^($HELDOUT)\$" '$1 ~ re { print $3 }' "$WORK/web.tsv" > "$DATA/web-heldout.txt"
awk -F'\t' -v re="^($HELDOUT)\$" '
  $1 !~ re { if ($1 != prev) { print "@@BOOK " $1; prev = $1 } print $3 }' "$WORK/kjv.tsv" > "$WORK/kjv-train.txt"
# calibration: verses of the training books, blocks of 20 consecutive verses, every 40th block
awk -F'\t' -v re="^($HELDOUT)\$" '
  $1 !~ re { if (int(i / 20) % 40 == 0) print $3; i++ }' "$WORK/kjv.tsv" > "$DATA/kjv-calib.txt"

for f in "$DATA/kjv-heldout.txt" "$DATA/web-heldout.txt" "$DATA/kjv-calib.txt" "$WORK/kjv-train.txt"; do
  printf '%-26s %6d lines %8d bytes\n' "$f" "$(wc -l < "$f")" "$(wc -c < "$f")" >&2
done
